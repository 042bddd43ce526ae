"""Text encoder and fusion encoder: BERT layers (post-norm, so BERT weights load exactly).

Fusion layers self-attend over the text and then cross-attend to the image tokens, bidirectionally
(ALBEF's layers 6-11). Several text streams may share one image: the fusion encoder takes images
[M, N, Dv] and text [M * G, L, D], stream t using image t // G. Cross-attention queries do not
interact, so the G streams of an image are attended as one [G * L] query block: the image keys and
values are projected once per image, not once per stream.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import CrossAttention, KeyPadding, SelfAttention
from .config import ModelConfig


class BertEmbeddings(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = config.text_hidden
        self.word_embeddings = nn.Embedding(config.vocab_size, hidden)
        self.position_embeddings = nn.Embedding(config.max_position, hidden)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, hidden)
        self.norm = nn.LayerNorm(hidden, eps=config.text_layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_ids: Tensor) -> Tensor:
        positions = self.position_embeddings.weight[: input_ids.shape[1]]
        # Every token has segment 0, as in ALBEF.
        x = self.word_embeddings(input_ids) + positions + self.token_type_embeddings.weight[0]
        return self.dropout(self.norm(x))


class BertLayer(nn.Module):
    def __init__(self, config: ModelConfig, backend: str, cross_attention: bool):
        super().__init__()
        hidden, heads, eps, p = config.text_hidden, config.text_heads, config.text_layer_norm_eps, config.dropout
        self.self_attn = SelfAttention(hidden, heads, backend, dropout=p)
        self.self_attn_norm = nn.LayerNorm(hidden, eps=eps)
        if cross_attention:
            self.cross_attn = CrossAttention(hidden, config.vision_hidden, heads, backend, dropout=p)
            self.cross_attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.ffn_in = nn.Linear(hidden, config.text_intermediate)
        self.ffn_out = nn.Linear(config.text_intermediate, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(p)

    def forward(self, x: Tensor, key_padding: KeyPadding, image: Tensor | None = None) -> Tensor:
        x = self.self_attn_norm(x + self.dropout(self.self_attn(x, key_padding=key_padding)))
        if image is not None:
            streams, length, hidden = x.shape
            grouped = x.reshape(len(image), -1, hidden)
            attended = self.cross_attn(grouped, image).reshape(streams, length, hidden)
            x = self.cross_attn_norm(x + self.dropout(attended))
        return self.ffn_norm(x + self.dropout(self.ffn_out(F.gelu(self.ffn_in(x)))))


def _run_layers(layers: nn.ModuleList, x: Tensor, checkpointed: bool, *args) -> Tensor:
    for layer in layers:
        x = checkpoint(layer, x, *args, use_reentrant=False) if checkpointed else layer(x, *args)
    return x


class TextEncoder(nn.Module):
    """BERT's embeddings and first `text_layers` layers: contextual token states, [CLS] first."""

    def __init__(self, config: ModelConfig, backend: str):
        super().__init__()
        self.grad_checkpointing = config.grad_checkpointing
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config, backend, False) for _ in range(config.text_layers))

    def forward(self, input_ids: Tensor, key_padding: KeyPadding) -> Tensor:
        checkpointed = self.grad_checkpointing and self.training
        return _run_layers(self.layers, self.embeddings(input_ids), checkpointed, key_padding)


class FusionEncoder(nn.Module):
    def __init__(self, config: ModelConfig, backend: str):
        super().__init__()
        self.grad_checkpointing = config.grad_checkpointing
        self.layers = nn.ModuleList(BertLayer(config, backend, True) for _ in range(config.fusion_layers))

    def forward(self, text: Tensor, key_padding: KeyPadding, image: Tensor) -> Tensor:
        if len(text) % len(image):
            raise ValueError(f"{len(text)} text streams cannot be grouped evenly over {len(image)} images")
        checkpointed = self.grad_checkpointing and self.training
        return _run_layers(self.layers, text, checkpointed, key_padding, image)


def stack_streams(*streams: Tensor) -> Tensor:
    """Interleave per-image streams [M, ...] x G into [M * G, ...] in the order the fusion encoder expects."""
    return torch.stack(streams, dim=1).flatten(0, 1)
