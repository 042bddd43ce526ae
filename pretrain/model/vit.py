"""Image encoder: a ViT with [CLS], learned positions and pre-norm blocks (as ViT / ALBEF)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import SelfAttention
from .config import ModelConfig


class VisionBlock(nn.Module):
    def __init__(self, config: ModelConfig, backend: str):
        super().__init__()
        hidden, eps = config.vision_hidden, config.vision_layer_norm_eps
        self.norm1 = nn.LayerNorm(hidden, eps=eps)
        self.attn = SelfAttention(hidden, config.vision_heads, backend)
        self.norm2 = nn.LayerNorm(hidden, eps=eps)
        self.fc1 = nn.Linear(hidden, config.vision_mlp)
        self.fc2 = nn.Linear(config.vision_mlp, hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def conv_stem(config: ModelConfig) -> nn.Sequential:
    """ViT_C's patch embedding (Xiao et al. 2021, "Early convolutions help transformers see better"):
    log2(patch_size) 3x3 stride-2 convs, widths doubling up to the hidden size, each with GroupNorm and GELU,
    then a 1x1 conv; [B, 3, H, W] -> [B, D, H / p, W / p] as the linear patch embedding."""
    hidden, count = config.vision_hidden, config.patch_size.bit_length() - 1
    layers: list[nn.Module] = []
    width_in = 3
    for i in range(count):
        width = max(hidden >> (count - 1 - i), 8)
        layers += [nn.Conv2d(width_in, width, 3, stride=2, padding=1), nn.GroupNorm(1, width), nn.GELU()]
        width_in = width
    return nn.Sequential(*layers, nn.Conv2d(width_in, hidden, 1))


class VisionTransformer(nn.Module):
    def __init__(self, config: ModelConfig, backend: str):
        super().__init__()
        hidden = config.vision_hidden
        self.grad_checkpointing = config.grad_checkpointing
        if config.patch_stem == "conv":
            self.patch_embed = conv_stem(config)
        else:
            self.patch_embed = nn.Conv2d(3, hidden, kernel_size=config.patch_size, stride=config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, hidden))
        self.blocks = nn.ModuleList(VisionBlock(config, backend) for _ in range(config.vision_layers))
        self.norm = nn.LayerNorm(hidden, eps=config.vision_layer_norm_eps)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """[B, 3, H, W] -> token states [B, 1 + patches, D] ([CLS] first)."""
        patches = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(patches), -1, -1), patches], dim=1) + self.pos_embed
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.grad_checkpointing and self.training else block(x)
        return self.norm(x)
