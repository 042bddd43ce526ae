"""Running a function on several local ranks over gloo, as a data-parallel job would, and collecting what
each returns. The rendezvous is a file store: no port to pick, so parallel test runs cannot collide."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain import compat


def _entry(rank: int, world: int, store: str, init_group: bool, fn: Callable, args: tuple, out) -> None:
    if init_group:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        out[rank] = fn(rank, world, *args) if init_group else fn(rank, world, store, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_ranks(fn: Callable, *args, store: Path, world: int = 2, init_group: bool = True) -> dict:
    """{rank: fn(rank, world, *args)} from `world` processes. `fn` must be a module-level function; with
    init_group=False it is called as fn(rank, world, store, *args) and starts its own process group (e.g.
    DeepSpeed's) from the file store."""
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_entry, args=(world, str(store), init_group, fn, args, out), nprocs=world, join=True)
        return dict(out)


def start_deepspeed(
    rank: int, world: int, store: str, ranks_per_node: int | None = None, keep_shm_buffers: bool = False
) -> None:
    """DeepSpeed's process group on the file store, in the environment its launcher sets (the port only names
    DeepSpeed's /dev/shm all-reduce buffers, so the parent's pid keeps parallel runs apart). The buffers are
    unlinked once every rank has mapped them, as `pretrain.train.engine.start_distributed` does."""
    import deepspeed  # here, so that tests without DeepSpeed do not pay for its import on every rank

    per_node = ranks_per_node or world
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(os.getppid()),
        RANK=str(rank),
        LOCAL_RANK=str(rank % per_node),
        LOCAL_SIZE=str(per_node),
        WORLD_SIZE=str(world),
    )
    deepspeed.init_distributed(dist_backend="gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    if not keep_shm_buffers:
        compat.release_deepspeed_shm_buffers()


def average_over_ranks(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """What a data-parallel engine does with losses and gradients: the mean over ranks, in place."""
    for t in tensors:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return tensors
