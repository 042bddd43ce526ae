"""Padded text batches and their real tokens: which positions are padding, packing and re-padding.

Captions come padded to a fixed length (identical shapes on every rank), but most of a caption batch
is padding. The text and fusion encoders therefore run every token-wise op (projections, FFN,
LayerNorms) on the real tokens only, packed as rows [T, ...] in batch-major order; attention either
takes them as they are (flash-attn's varlen kernel, through `cu_seqlens`) or re-pads them for a
padded kernel. Padding positions of a re-padded tensor are zeros.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class KeyPadding:
    """Which tokens of a padded batch [B, L] are real (True) or padding (False); computed once per forward."""

    mask: Tensor

    @cached_property
    def sdpa_mask(self) -> Tensor:
        return self.mask[:, None, None, :]

    @cached_property
    def indices(self) -> Tensor:
        """Flat positions (into B * L) of the real tokens, in batch-major order."""
        return self.mask.flatten().nonzero().flatten()

    @cached_property
    def cu_seqlens(self) -> Tensor:
        lengths = self.mask.sum(dim=1, dtype=torch.int32)
        return F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))

    @cached_property
    def max_seqlen(self) -> int:
        return int(self.mask.sum(dim=1).max())

    def unpad(self, padded: Tensor) -> Tensor:
        """[B, L, ...] -> the real tokens' rows [T, ...]."""
        return padded.flatten(0, 1).index_select(0, self.indices)

    def pad(self, packed: Tensor) -> Tensor:
        """The real tokens' rows [T, ...] -> [B, L, ...], zeros at padding positions."""
        batch, length = self.mask.shape
        padded = packed.new_zeros(batch * length, *packed.shape[1:]).index_copy(0, self.indices, packed)
        return padded.unflatten(0, (batch, length))

    def grouped(self, groups: int) -> KeyPadding:
        """The same tokens seen as `groups` sequences of consecutive rows ([B, L] -> [groups, B // groups * L]):
        the real tokens keep their packed order, so packed tensors need no copy."""
        return KeyPadding(self.mask.reshape(groups, -1))
