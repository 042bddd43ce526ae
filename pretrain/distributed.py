"""Cross-rank helpers shared by the model library, training and evaluation.

Everything works without torch.distributed too (one process is rank 0 of 1), so the model and the
evaluation run unchanged in a notebook.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from pretrain import compat


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


# torch 2.13 renamed all_gather_into_tensor (deprecated there) to all_gather_single; older releases lack the new name
_all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)


def _all_gather(x: Tensor) -> Tensor:
    out = x.new_empty((world_size() * len(x), *x.shape[1:]))
    _all_gather_single(out, x.contiguous())
    return out


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return _all_gather(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        # Every rank's loss saw every rank's rows: sum their gradients, keep this rank's slice.
        # (all_reduce rather than reduce_scatter, which gloo lacks.)
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad.chunk(world_size())[rank()]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate `x` from every rank along dim 0 (rank order); gradients flow back to each rank's slice."""
    return _GatherWithGrad.apply(x) if world_size() > 1 else x


def gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate `x` from every rank along dim 0 (rank order), outside autograd."""
    return _all_gather(x) if world_size() > 1 else x


def _exchange(x: Tensor, send_counts: list[int], receive_counts: list[int]) -> Tensor:
    """all_to_all: this rank's first send_counts[0] rows to rank 0, the next to rank 1, ...; receives
    receive_counts[r] rows from rank r, in rank order."""
    out = x.new_empty((sum(receive_counts), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), receive_counts, send_counts)
    return out


class _FetchRows(torch.autograd.Function):
    """Rows of the ranks' concatenated `x` by global index, moving only those rows: each rank sends the
    indices it wants to their owners (all_to_all), the owners send the rows back; backward returns each
    row's gradient to its owner the same way, summed there over everyone who fetched it."""

    @staticmethod
    def forward(ctx, x: Tensor, indices: Tensor) -> Tensor:
        owners = torch.div(indices, len(x), rounding_mode="floor")
        order = torch.argsort(owners, stable=True)
        send_counts = torch.bincount(owners, minlength=world_size())
        receive_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(receive_counts, send_counts)
        send, receive = send_counts.tolist(), receive_counts.tolist()
        wanted_here = _exchange((indices % len(x))[order], send, receive)  # rows others want from this rank
        rows = _exchange(x[wanted_here], receive, send)
        ctx.save_for_backward(order, wanted_here)
        ctx.counts, ctx.rows_here = (send, receive), len(x)
        return rows.new_empty(rows.shape).index_copy_(0, order, rows)

    @staticmethod
    def backward(ctx, grad: Tensor):
        order, wanted_here = ctx.saved_tensors
        send, receive = ctx.counts
        grad_here = _exchange(grad[order], send, receive)
        grad_x = grad.new_zeros((ctx.rows_here, *grad.shape[1:])).index_add_(0, wanted_here, grad_here)
        return grad_x, None


def fetch_rows(x: Tensor, indices: Tensor) -> Tensor:
    """`gather_with_grad(x)[indices]` (every rank holds as many rows as the others) without gathering all
    of `x`: only the indexed rows cross ranks, and their gradients flow back to the owning rank."""
    return _FetchRows.apply(x, indices) if world_size() > 1 else x[indices]


def apply_collective_timeout(timeout: timedelta) -> None:
    """Give every process group the timeout. DeepSpeed makes groups of its own without one (a clone of the
    world group, for one), and those get torch's default: 30 min on gloo."""
    for group in compat.process_groups():
        compat.set_group_timeout(group, timeout)
