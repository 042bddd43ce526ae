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


def apply_collective_timeout(timeout: timedelta) -> None:
    """Give every process group the timeout. DeepSpeed makes groups of its own without one (a clone of the
    world group, for one), and those get torch's default: 30 min on gloo."""
    for group in compat.process_groups():
        compat.set_group_timeout(group, timeout)
