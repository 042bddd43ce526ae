"""Tiny Hugging Face ViT / BERT checkpoints shaped like the `tiny` preset, for the weight-loading tests.

Written out here rather than through `pretrain.model.hf_io`'s own config builders, so that a mistake there
cannot hide in the test. Each builder draws its weights from its own seed and leaves the global RNG as it
was: the weights are the same whatever ran before, and building one changes no later draw. Every parameter
is drawn, LayerNorms and biases included: HF initialises those to 1 and 0, as our own init does, so a load
that skipped or mixed them up would otherwise go unnoticed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import BertConfig, BertForMaskedLM, PreTrainedModel, ViTConfig, ViTModel

from pretrain.model import ModelConfig
from tests.helpers.model import VOCAB, tiny_config


def _seeded(build: Callable[[], PreTrainedModel], seed: int) -> PreTrainedModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # transformers' init draws from the global RNG
        model = build()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.eval()


def hf_vit(image_size: int = 64, seed: int = 1, config: ModelConfig | None = None) -> ViTModel:
    """A `ViTModel` (no pooler) with the ViT of `config` (the tiny preset) at `image_size` pixels."""
    c = config or tiny_config()
    hf_config = ViTConfig(
        hidden_size=c.vision_hidden, num_hidden_layers=c.vision_layers, num_attention_heads=c.vision_heads,
        intermediate_size=c.vision_mlp, image_size=image_size, patch_size=c.patch_size,
    )  # fmt: skip
    return _seeded(lambda: ViTModel(hf_config, add_pooling_layer=False), seed)


def hf_bert(
    vocab_size: int = VOCAB, layers: int | None = None, hidden: int | None = None, seed: int = 2,
    config: ModelConfig | None = None,
) -> BertForMaskedLM:  # fmt: skip
    """A `BertForMaskedLM` with the text + fusion layers of `config` (the tiny preset): `layers` and `hidden`
    override the layer count and width (to build checkpoints that do not fit)."""
    c = config or tiny_config()
    hidden = hidden or c.text_hidden
    hf_config = BertConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers or c.text_layers + c.fusion_layers,
        num_attention_heads=c.text_heads, intermediate_size=c.text_intermediate,
        max_position_embeddings=c.max_position,
    )  # fmt: skip
    return _seeded(lambda: BertForMaskedLM(hf_config), seed)
