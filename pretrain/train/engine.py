"""The DeepSpeed engine: process group, per-rank seeds, the model built partitioned and initialised,
pretrained weights, optimizer and schedule."""

from __future__ import annotations

import os

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from torch.distributed import DistNetworkError

from pretrain import compat
from pretrain.distributed import apply_collective_timeout
from pretrain.train.ds_config import zero_stage
from pretrain.train.optim import build_optimizer, build_scheduler
from pretrain.train.preflight import Setup
from pretrain.train.recipe import DistSection, RecipeError


def share_cpu_cores() -> None:
    """On CPU, give each local rank its share of the cores: torch's default (all cores per process)
    oversubscribes them when several ranks share a machine. OMP_NUM_THREADS, if set, wins."""
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))


def start_distributed(section: DistSection) -> None:
    """Join the process group; a rendezvous port another process holds is one RecipeError naming MASTER_PORT.

    On CPU, DeepSpeed maps a /dev/shm all-reduce buffer per rank and spins until every rank's exists: a rank
    that got that far when another failed to start was killed there and left its buffer behind. So every rank
    first proves the group works (a barrier), and whatever happens after that, this rank's buffer name is
    unlinked when init is over or the rank is gone."""
    compat.warn_if_untested()
    try:
        dist.init_process_group(backend=section.backend, timeout=section.timeout)
    except DistNetworkError as err:
        if "EADDRINUSE" not in str(err):
            raise
        raise RecipeError(f"MASTER_PORT={os.environ.get('MASTER_PORT')} is taken on this machine (another job?): "
                          "unset MASTER_PORT on one node to pick a free port, or set a free one") from None
    if torch.cuda.is_available():  # only DeepSpeed's CPU accelerator maps the buffers
        deepspeed.init_distributed(dist_backend=section.backend, timeout=section.timeout)
        return
    dist.barrier()
    # A rank that fails inside init leaves the others spinning there, mapped, until the launcher kills them
    with compat.unlink_when_closed(compat.deepspeed_shm_buffer(dist.get_rank())):
        deepspeed.init_distributed(dist_backend=section.backend, timeout=section.timeout)
        compat.release_deepspeed_shm_buffers()


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """A seed of its own for each rank, so the ranks' ITM negative draws and dropout masks are independent;
    deterministic in (seed, rank), so the same job draws the same again (and in the step resumed from, when
    a job continues on another number of ranks without the saved generator states)."""
    return int(np.random.SeedSequence([seed, rank] + ([step] if step else [])).generate_state(1)[0])


def build_engine(setup: Setup):
    """The model built inside zero.Init (so it never has to fit on one device), initialised and loaded
    with pretrained weights in place, wrapped with its optimizer and schedule in a DeepSpeed engine.

    The weights are drawn from the recipe's seed alone (every rank alike); afterwards each rank's own seed
    drives the training randomness."""
    recipe, stage = setup.recipe, zero_stage(setup.ds_config)
    torch.manual_seed(recipe.seed)
    with deepspeed.zero.Init(config_dict_or_path=setup.ds_config, enabled=stage == 3):
        model = setup.task.build_model(setup)
    if stage == 3:
        initialise_partitioned(model)
    setup.task.load_weights(model, setup)
    offload = setup.ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu"
    optimizer = build_optimizer(model, recipe.optim, offload_to_cpu=offload)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=setup.ds_config,
                                           lr_scheduler=build_scheduler(optimizer, recipe.schedule, recipe.optim))
    apply_collective_timeout(recipe.dist.timeout)
    torch.manual_seed(rank_seed(recipe.seed, dist.get_rank()))
    held = sum(getattr(p, "ds_tensor", p).numel() for p in model.parameters())
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    print(f"[vlpretrain] rank {dist.get_rank()} holds {held} of {total} parameter elements", flush=True)
    return engine


def initialise_partitioned(model) -> None:
    """Run the model's own initialisation on a model built under zero.Init.

    zero.Init partitions each submodule as soon as its __init__ returns, so initialisation done later by a
    parent only touched empty shards (a zero [CLS] token then meets a LayerNorm with eps 1e-12, and the
    first gradients are ~1e4). Gather one module's own parameters at a time, let rank 0 initialise them,
    and GatheredParameters re-partitions rank 0's values to every rank. Only needed (and only called)
    under ZeRO-3: without it the model's own __init__ already initialised everything.
    """
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if own:
            with deepspeed.zero.GatheredParameters(own, modifier_rank=0), torch.no_grad():
                if dist.get_rank() == 0:
                    model.init_weights(module)
