"""Text encoder and fusion encoder: BERT layers (post-norm, so BERT weights load exactly).

Fusion layers self-attend over the text and then cross-attend to the image tokens, bidirectionally
(ALBEF's layers 6-11). Several text streams may share one image: the fusion encoder takes images
[M, N, Dv] and text [M * G, L, D], stream t using image t // G. Cross-attention queries do not
interact, so the G streams of an image are attended as one [G * L] query block: the image keys and
values are projected once per image, not once per stream.

Both encoders take and return padded text [B, L, D] but run on its real tokens only, packed [T, D]
(padding.py): padding costs no projection, FFN or LayerNorm. Padding positions of the output are zeros.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import CrossAttention, SelfAttention
from .config import ModelConfig
from .padding import KeyPadding


class BertEmbeddings(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = config.text_hidden
        self.word_embeddings = nn.Embedding(config.vocab_size, hidden)
        self.position_embeddings = nn.Embedding(config.max_position, hidden)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, hidden)
        self.norm = nn.LayerNorm(hidden, eps=config.text_layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_ids: Tensor, padding: KeyPadding, inputs_embeds: Tensor | None = None) -> Tensor:
        """Padded ids [B, L] -> embeddings of the real tokens [T, D]. `inputs_embeds` [B, L, D], when given,
        replaces the word embeddings of `input_ids` (learned prompt vectors, as in Hugging Face's BERT)."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        ids, positions = padding.unpad(input_ids), padding.unpad(positions)
        words = self.word_embeddings(ids) if inputs_embeds is None else padding.unpad(inputs_embeds)
        # Every token has segment 0, as in ALBEF. The module is called (not its weight read) so that ZeRO-3
        # fetches the table through its forward hooks.
        segment = self.token_type_embeddings(ids.new_zeros(1))
        x = words + self.position_embeddings(positions) + segment
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

    def forward(
        self, x: Tensor, text: KeyPadding, image: Tensor | None = None, per_image: KeyPadding | None = None
    ) -> Tensor:
        """x: the real tokens [T, D] of text laid out as `text`; with `image` [M, N, Dv] also `per_image`,
        the same tokens as M query blocks (`text.grouped(M)`), one per image."""
        x = self.self_attn_norm(x + self.dropout(self.self_attn(x, text)))
        if image is not None:
            x = self.cross_attn_norm(x + self.dropout(self.cross_attn(x, per_image, image)))
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

    def forward(self, input_ids: Tensor, key_padding: KeyPadding, inputs_embeds: Tensor | None = None) -> Tensor:
        checkpointed = self.grad_checkpointing and self.training
        x = _run_layers(self.layers, self.embeddings(input_ids, key_padding, inputs_embeds), checkpointed, key_padding)
        return key_padding.pad(x)


class FusionEncoder(nn.Module):
    def __init__(self, config: ModelConfig, backend: str):
        super().__init__()
        self.grad_checkpointing = config.grad_checkpointing
        self.layers = nn.ModuleList(BertLayer(config, backend, True) for _ in range(config.fusion_layers))

    def forward(self, text: Tensor, key_padding: KeyPadding, image: Tensor) -> Tensor:
        if len(text) % len(image):
            raise ValueError(f"{len(text)} text streams cannot be grouped evenly over {len(image)} images")
        checkpointed = self.grad_checkpointing and self.training
        per_image = key_padding.grouped(len(image))
        x = _run_layers(self.layers, key_padding.unpad(text), checkpointed, key_padding, image, per_image)
        return key_padding.pad(x)


def stack_streams(*streams: Tensor) -> Tensor:
    """Interleave per-image streams [M, ...] x G into [M * G, ...] in the order the fusion encoder expects."""
    return torch.stack(streams, dim=1).flatten(0, 1)
