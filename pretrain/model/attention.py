"""The one attention function every self- and cross-attention in the model goes through.

Backends: `flash_attn` (flash-attn 2; unpadded variable-length text through `flash_attn_varlen_func`),
`sdpa` (torch's scaled_dot_product_attention: flash / memory-efficient kernels on GPU, the fused kernel
on CPU), `eager` (the plain reference). `auto` decides per input device and dtype: flash-attn for
fp16/bf16 CUDA inputs when the package is installed, sdpa for other CUDA inputs and fp32 on CPU, eager
for bf16 on CPU. `flash_attn` itself falls back to sdpa for inputs flash-attn cannot take (CPU, fp32).
"""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass
from functools import cache, cached_property

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

FLASH_ATTN_INSTALLED = importlib.util.find_spec("flash_attn") is not None


@dataclass
class KeyPadding:
    """Which keys are real tokens (True) or padding (False), [B, L]; computed once per forward."""

    mask: Tensor

    @cached_property
    def sdpa_mask(self) -> Tensor:
        return self.mask[:, None, None, :]

    @cached_property
    def indices(self) -> Tensor:
        return self.mask.flatten().nonzero().flatten()

    @cached_property
    def cu_seqlens(self) -> Tensor:
        lengths = self.mask.sum(dim=1, dtype=torch.int32)
        return F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))

    @cached_property
    def max_seqlen(self) -> int:
        return int(self.mask.sum(dim=1).max())


def check_backend(backend: str) -> str:
    if backend == "flash_attn" and not FLASH_ATTN_INSTALLED:
        raise RuntimeError("attention backend flash_attn needs the flash-attn package: pip install .[gpu]")
    return backend


@cache
def _auto_backend(device_type: str, dtype: torch.dtype) -> str:
    """The fastest backend for these inputs, logged once per (device, dtype)."""
    half = dtype in (torch.float16, torch.bfloat16)
    if device_type == "cuda":
        chosen = "flash_attn" if FLASH_ATTN_INSTALLED and half else "sdpa"
    else:
        # Measured on this project's CPUs: torch's fused CPU kernel is slower than plain matmuls in
        # bf16 (its backward most of all) and on par or faster in fp32.
        chosen = "eager" if half else "sdpa"
    logger.info("attention backend auto -> %s for %s %s inputs", chosen, device_type, dtype)
    return chosen


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    backend: str,
    key_padding: KeyPadding | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Scaled dot-product attention on [B, L, H, Dh] tensors, returning [B, Lq, H, Dh].

    `key_padding` masks padded keys; query rows at padded positions are don't-care in every backend.
    """
    if backend == "auto":
        backend = _auto_backend(q.device.type, q.dtype)
    if backend == "flash_attn" and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return _flash_attention(q, k, v, key_padding, dropout_p)
    if backend == "eager":
        return _eager_attention(q, k, v, key_padding, dropout_p)
    mask = key_padding.sdpa_mask if key_padding is not None else None
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, dropout_p=dropout_p
    )
    return out.transpose(1, 2)


def _eager_attention(q: Tensor, k: Tensor, v: Tensor, key_padding: KeyPadding | None, dropout_p: float) -> Tensor:
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if key_padding is not None:
        scores = scores.masked_fill(~key_padding.sdpa_mask, float("-inf"))
    probs = F.dropout(scores.softmax(dim=-1), p=dropout_p)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


def _flash_attention(q: Tensor, k: Tensor, v: Tensor, key_padding: KeyPadding | None, dropout_p: float) -> Tensor:
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    if key_padding is None:
        return flash_attn_func(q, k, v, dropout_p=dropout_p)
    # Padded text self-attention: drop the padding tokens, attend over the packed sequences, scatter back.
    batch, length, heads, head_dim = q.shape
    idx, cu, max_len = key_padding.indices, key_padding.cu_seqlens, key_padding.max_seqlen
    packed = [t.reshape(batch * length, heads, head_dim)[idx] for t in (q, k, v)]
    out = flash_attn_varlen_func(*packed, cu, cu, max_len, max_len, dropout_p=dropout_p)
    padded = out.new_zeros(batch * length, heads, head_dim).index_copy(0, idx, out)
    return padded.view(batch, length, heads, head_dim)


class SelfAttention(nn.Module):
    """Multi-head self-attention; query, key and value come from one fused projection (one matmul)."""

    def __init__(self, hidden: int, heads: int, backend: str, dropout: float = 0.0):
        super().__init__()
        self.heads, self.backend, self.dropout = heads, backend, dropout
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor, key_padding: KeyPadding | None = None) -> Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).unbind(dim=2)
        dropout_p = self.dropout if self.training else 0.0
        out = attention(q, k, v, backend=self.backend, key_padding=key_padding, dropout_p=dropout_p)
        return self.out(out.flatten(-2))


class CrossAttention(nn.Module):
    """Multi-head attention from text queries to image keys / values (fused key-value projection)."""

    def __init__(self, hidden: int, context_hidden: int, heads: int, backend: str, dropout: float = 0.0):
        super().__init__()
        self.heads, self.backend, self.dropout = heads, backend, dropout
        self.query = nn.Linear(hidden, hidden)
        self.key_value = nn.Linear(context_hidden, 2 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        q = self.query(x).unflatten(-1, (self.heads, -1))
        k, v = self.key_value(context).unflatten(-1, (2, self.heads, -1)).unbind(dim=2)
        dropout_p = self.dropout if self.training else 0.0
        return self.out(attention(q, k, v, backend=self.backend, dropout_p=dropout_p).flatten(-2))
