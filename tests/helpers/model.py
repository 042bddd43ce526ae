"""Shared builders for the model tests: a tiny config and a batch following the batch contract (docs/data.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain.model import ModelConfig, model_preset

VOCAB = 96


def tiny_config(**overrides) -> ModelConfig:
    return model_preset("tiny", vocab_size=VOCAB, **overrides)


def _images(batch_size: int, size: int, g: torch.Generator) -> torch.Tensor:
    """Smooth random blobs: distinct at the scale of patches, like real pictures (white noise is not)."""
    coarse = torch.randn(batch_size, 3, 4, 4, generator=g)
    fine = 0.1 * torch.randn(batch_size, 3, size, size, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False) + fine


def make_batch(config: ModelConfig, batch_size: int = 6, length: int = 12, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, config.vocab_size, (batch_size, length), generator=g)
    input_ids[:, 0] = 1  # [CLS]
    lengths = torch.randint(length // 2, length + 1, (batch_size,), generator=g)
    attention_mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    input_ids = input_ids * attention_mask
    masked = (torch.rand(batch_size, length, generator=g) < 0.3) & attention_mask.bool()
    masked[:, 0] = False
    masked[:, 1] = True  # at least one masked token per caption
    mlm_input_ids = torch.where(masked, torch.full_like(input_ids, 4), input_ids)
    return {
        "pixel_values": _images(batch_size, config.image_size, g),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "mlm_input_ids": mlm_input_ids,
        "mlm_labels": torch.where(masked, input_ids, torch.full_like(input_ids, -100)),
        "image_ids": torch.arange(batch_size),
        "keys": [f"sample{i}" for i in range(batch_size)],
    }
