"""The loader's batch (the batch contract, docs/data.md) on the model's side of the boundary."""

from __future__ import annotations

import torch


def to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Tensors to the engine's device; floating ones (images) also to its compute dtype (bf16 under bf16).
    Non-tensors (sample keys) pass through."""
    moved = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, dtype) if value.is_floating_point() else value.to(device)
        moved[key] = value
    return moved
