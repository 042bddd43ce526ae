"""The attention functions every self- and cross-attention in the model goes through.

Backends: `flash_attn` (flash-attn 2; packed variable-length text through `flash_attn_varlen_func`),
`sdpa` (torch's scaled_dot_product_attention: flash / memory-efficient kernels on GPU, the fused kernel
on CPU), `eager` (the plain reference). `auto` decides per input device and dtype: flash-attn for
fp16/bf16 CUDA inputs when the package is installed, sdpa for other CUDA inputs and fp32 on CPU, eager
for bf16 on CPU. `flash_attn` itself falls back to sdpa for inputs flash-attn cannot take (CPU, fp32).

`attention` takes padded [B, L, H, Dh] tensors (the ViT's, and the reference); `packed_self_attention`,
`packed_cross_attention` and `packed_key_attention` take text as its real tokens only (see padding.py),
which flash-attn's varlen kernels attend as they are and the padded kernels get re-padded (one copy per
call).

Self-attention takes optional key/value prefixes [P, H, Dh] (prefix tuning, peft.py): P more keys and
values every query attends to, in front of each sequence's own, in every backend.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .padding import KeyPadding

logger = logging.getLogger(__name__)

FLASH_ATTN_INSTALLED = importlib.util.find_spec("flash_attn") is not None


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


def _resolve(backend: str, q: Tensor) -> str:
    if backend == "auto":
        return _auto_backend(q.device.type, q.dtype)
    if backend == "flash_attn" and not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)):
        return "sdpa"
    return backend


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    backend: str,
    key_padding: KeyPadding | None = None,
    dropout_p: float = 0.0,
    prefix: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Scaled dot-product attention on padded [B, L, H, Dh] tensors, returning [B, Lq, H, Dh].

    `key_padding` masks padded keys (and says which queries are real: self-attention); query rows at padded
    positions are don't-care in every backend. `prefix`: keys and values [P, H, Dh] put before every
    sequence's own.
    """
    backend = _resolve(backend, q)
    queries = key_padding
    if prefix is not None:
        k, v, key_padding = _with_prefix(k, v, key_padding, prefix)
    if backend == "flash_attn":
        from flash_attn import flash_attn_func, flash_attn_varlen_func

        if key_padding is None:
            return flash_attn_func(q, k, v, dropout_p=dropout_p)
        queries = queries or KeyPadding(q.new_ones(q.shape[:2], dtype=torch.bool))
        out = flash_attn_varlen_func(
            queries.unpad(q), key_padding.unpad(k), key_padding.unpad(v), queries.cu_seqlens,
            key_padding.cu_seqlens, queries.max_seqlen, key_padding.max_seqlen, dropout_p=dropout_p,
        )  # fmt: skip
        return queries.pad(out)
    if backend == "eager":
        return _eager_attention(q, k, v, key_padding, dropout_p)
    mask = key_padding.sdpa_mask if key_padding is not None else None
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, dropout_p=dropout_p
    )
    return out.transpose(1, 2)


def _with_prefix(k: Tensor, v: Tensor, key_padding: KeyPadding | None, prefix: tuple[Tensor, Tensor]
                 ) -> tuple[Tensor, Tensor, KeyPadding | None]:
    """Keys and values [B, P + L, H, Dh] with the prefixes first, and the key padding that says so."""
    prefix_k, prefix_v = (p.to(k.dtype).expand(len(k), -1, -1, -1) for p in prefix)
    if key_padding is not None:
        real = key_padding.mask.new_ones(len(k), prefix_k.shape[1])
        key_padding = KeyPadding(torch.cat([real, key_padding.mask], dim=1))
    return torch.cat([prefix_k, k], dim=1), torch.cat([prefix_v, v], dim=1), key_padding


def packed_self_attention(qkv: Tensor, *, backend: str, text: KeyPadding, dropout_p: float = 0.0,
                          prefix: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Self-attention of text given as its real tokens' rows qkv [T, 3, H, Dh] (the padded layout `text`),
    returning [T, H, Dh]. With `prefix` the keys are no longer the queries' own rows: every backend goes
    through `attention` (flash-attn through its varlen kernel with the prefixes' lengths)."""
    backend = _resolve(backend, qkv)
    if backend == "flash_attn" and prefix is None:
        from flash_attn import flash_attn_varlen_qkvpacked_func

        return flash_attn_varlen_qkvpacked_func(qkv, text.cu_seqlens, text.max_seqlen, dropout_p=dropout_p)
    q, k, v = text.pad(qkv).unbind(dim=2)  # one copy for all three
    return text.unpad(attention(q, k, v, backend=backend, key_padding=text, dropout_p=dropout_p, prefix=prefix))


def packed_cross_attention(
    q: Tensor, k: Tensor, v: Tensor, *, backend: str, queries: KeyPadding, dropout_p: float = 0.0
) -> Tensor:
    """Attention from queries given as real-token rows q [T, H, Dh] (the padded layout `queries`, S
    sequences) to dense keys and values k, v [S, N, H, Dh], sequence i attending to k[i]; returns [T, H, Dh]."""
    backend = _resolve(backend, q)
    if backend == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        sequences, key_len = k.shape[:2]
        cu_keys = torch.arange(0, (sequences + 1) * key_len, key_len, dtype=torch.int32, device=k.device)
        k, v = k.flatten(0, 1), v.flatten(0, 1)
        return flash_attn_varlen_func(
            q, k, v, queries.cu_seqlens, cu_keys, queries.max_seqlen, key_len, dropout_p=dropout_p
        )
    return queries.unpad(attention(queries.pad(q), k, v, backend=backend, dropout_p=dropout_p))


def packed_key_attention(
    q: Tensor, k: Tensor, v: Tensor, *, backend: str, keys: KeyPadding, dropout_p: float = 0.0
) -> Tensor:
    """Attention from dense queries q [S, N, H, Dh] to keys and values given as real-token rows k, v
    [T, H, Dh] (the padded layout `keys`, S sequences), sequence i attending to its own; returns [S, N, H, Dh].
    The image stream of co-attention fusion attending to the text."""
    backend = _resolve(backend, q)
    if backend == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        sequences, query_len = q.shape[:2]
        cu_queries = torch.arange(0, (sequences + 1) * query_len, query_len, dtype=torch.int32, device=q.device)
        out = flash_attn_varlen_func(
            q.flatten(0, 1), k, v, cu_queries, keys.cu_seqlens, query_len, keys.max_seqlen, dropout_p=dropout_p
        )
        return out.unflatten(0, (sequences, query_len))
    return attention(q, keys.pad(k), keys.pad(v), backend=backend, key_padding=keys, dropout_p=dropout_p)


def _eager_attention(q: Tensor, k: Tensor, v: Tensor, key_padding: KeyPadding | None, dropout_p: float) -> Tensor:
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if key_padding is not None:
        scores = scores.masked_fill(~key_padding.sdpa_mask, float("-inf"))
    probs = F.dropout(scores.softmax(dim=-1), p=dropout_p)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


class SelfAttention(nn.Module):
    """Multi-head self-attention; query, key and value come from one fused projection (one matmul)."""

    def __init__(self, hidden: int, heads: int, backend: str, dropout: float = 0.0):
        super().__init__()
        self.heads, self.backend, self.dropout = heads, backend, dropout
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.prefix: nn.Module | None = None  # prefix tuning sets a module returning key/value prefixes (peft.py)

    def forward(self, x: Tensor, packed: KeyPadding | None = None) -> Tensor:
        """x: dense [B, L, D]; or, with `packed`, the real tokens [T, D] of a padded batch of that layout."""
        qkv = self.qkv(x).unflatten(-1, (3, self.heads, -1))
        dropout_p = self.dropout if self.training else 0.0
        prefix = self.prefix() if self.prefix is not None else None  # called: ZeRO-3 gathers it by its hooks
        if packed is None:
            out = attention(*qkv.unbind(dim=2), backend=self.backend, dropout_p=dropout_p, prefix=prefix)
        else:
            out = packed_self_attention(qkv, backend=self.backend, text=packed, dropout_p=dropout_p, prefix=prefix)
        return self.out(out.flatten(-2))


class CrossAttention(nn.Module):
    """Multi-head attention from packed text queries to image keys / values (fused key-value projection)."""

    def __init__(self, hidden: int, context_hidden: int, heads: int, backend: str, dropout: float = 0.0):
        super().__init__()
        self.heads, self.backend, self.dropout = heads, backend, dropout
        self.query = nn.Linear(hidden, hidden)
        self.key_value = nn.Linear(context_hidden, 2 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor, packed: KeyPadding, context: Tensor) -> Tensor:
        """x: the real tokens [T, D] of `packed`'s S query sequences; context: [S, N, D_context]."""
        q = self.query(x).unflatten(-1, (self.heads, -1))
        k, v = self.key_value(context).unflatten(-1, (2, self.heads, -1)).unbind(dim=2)
        dropout_p = self.dropout if self.training else 0.0
        out = packed_cross_attention(q, k, v, backend=self.backend, queries=packed, dropout_p=dropout_p)
        return self.out(out.flatten(-2))


class TextCrossAttention(CrossAttention):
    """Multi-head attention from dense image queries to packed text keys / values: CrossAttention's weights,
    the other direction."""

    def forward(self, x: Tensor, text: Tensor, keys: KeyPadding) -> Tensor:
        """x: [S, N, D]; text: the real tokens [T, D_context] of `keys`'s S sequences."""
        q = self.query(x).unflatten(-1, (self.heads, -1))
        k, v = self.key_value(text).unflatten(-1, (2, self.heads, -1)).unbind(dim=1)
        dropout_p = self.dropout if self.training else 0.0
        out = packed_key_attention(q, k, v, backend=self.backend, keys=keys, dropout_p=dropout_p)
        return self.out(out.flatten(-2))
