"""Fusion encoders: ALBEF's cross-attention (text attends to the image; bert.FusionEncoder) or ViLBERT-style
co-attention (two streams, each attending to the other in the same layer).

Both take text streams [M * G, L, D] (padded, run on their real tokens) and images [M, N, D_v], stream t
using image t // G, and return the fused text states [M * G, L, D]: ITM reads their [CLS], MLM their masked
positions, whichever fusion built them.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import SelfAttention, TextCrossAttention
from .bert import BertLayer, FusionEncoder
from .config import ModelConfig
from .padding import KeyPadding


class ImageStreamLayer(nn.Module):
    """The image stream's half of a co-attention layer, post-norm as BERT's: self-attention over the image
    tokens, cross-attention to the text tokens, FFN (ViT's widths and heads)."""

    def __init__(self, config: ModelConfig, backend: str):
        super().__init__()
        hidden, heads, eps, p = config.vision_hidden, config.vision_heads, config.vision_layer_norm_eps, config.dropout
        self.self_attn = SelfAttention(hidden, heads, backend, dropout=p)
        self.self_attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.cross_attn = TextCrossAttention(hidden, config.text_hidden, heads, backend, dropout=p)
        self.cross_attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.ffn_in = nn.Linear(hidden, config.vision_mlp)
        self.ffn_out = nn.Linear(config.vision_mlp, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(p)

    def forward(self, image: Tensor, text: Tensor, text_padding: KeyPadding) -> Tensor:
        """image: [S, N, D_v], one per text stream; text: the streams' real tokens [T, D] laid out as `text_padding`."""
        x = self.self_attn_norm(image + self.dropout(self.self_attn(image)))
        x = self.cross_attn_norm(x + self.dropout(self.cross_attn(x, text, text_padding)))
        return self.ffn_norm(x + self.dropout(self.ffn_out(F.gelu(self.ffn_in(x)))))


class CoAttentionFusionEncoder(nn.Module):
    """ViLBERT's co-attention: in each layer the text stream (a BERT layer: self-attention, cross-attention to
    the image stream, FFN) and the image stream (ImageStreamLayer) each attend to the other's states from
    before the layer. The last layer's image update would feed nothing (ITM and MLM read the text), so there
    are fusion_layers text layers and fusion_layers - 1 image layers. Each text stream gets an image stream
    of its own (an image shared by G streams is repeated G times: its states diverge)."""

    def __init__(self, config: ModelConfig, backend: str):
        super().__init__()
        self.grad_checkpointing = config.grad_checkpointing
        self.text_layers = nn.ModuleList(BertLayer(config, backend, True) for _ in range(config.fusion_layers))
        self.image_layers = nn.ModuleList(ImageStreamLayer(config, backend) for _ in range(config.fusion_layers - 1))

    def forward(self, text: Tensor, key_padding: KeyPadding, image: Tensor) -> Tensor:
        if len(text) % len(image):
            raise ValueError(f"{len(text)} text streams cannot be grouped evenly over {len(image)} images")
        image = image.repeat_interleave(len(text) // len(image), dim=0)
        run = self._checkpointed if self.grad_checkpointing and self.training else self._plain
        x = key_padding.unpad(text)
        for i, text_layer in enumerate(self.text_layers):
            updated_text = run(text_layer, x, key_padding, image, key_padding)  # each stream its own image
            if i < len(self.image_layers):
                image = run(self.image_layers[i], image, x, key_padding)
            x = updated_text
        return key_padding.pad(x)

    @staticmethod
    def _plain(layer: nn.Module, *args) -> Tensor:
        return layer(*args)

    @staticmethod
    def _checkpointed(layer: nn.Module, *args) -> Tensor:
        return checkpoint(layer, *args, use_reentrant=False)


def build_fusion_encoder(config: ModelConfig, backend: str) -> nn.Module:
    if config.fusion == "co_attention":
        return CoAttentionFusionEncoder(config, backend)
    return FusionEncoder(config, backend)
