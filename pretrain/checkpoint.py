"""Checkpoints through DeepSpeed's save/load, with everything a resume needs in client_state.

DeepSpeed writes `client_state` only from data-parallel rank 0, so per-rank state (loader position, RNG)
is gathered from every rank first and stored as a list indexed by rank.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

TAG_PATTERN = re.compile(r"^step(\d{8})$")


def checkpoint_tag(step: int) -> str:
    return f"step{step:08d}"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(engine, ckpt_dir: Path, step: int, rank_state: dict, keep: int) -> str:
    """All ranks call this. Returns the tag written; prunes to the newest `keep` tags."""
    rank_states = [None] * dist.get_world_size()
    dist.all_gather_object(rank_states, rank_state)
    tag = checkpoint_tag(step)
    # DeepSpeed's own `latest` is written by rank 0 with a plain write and no barrier after the other
    # ranks' shards; ours is written once every rank has finished, and replaced atomically.
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step, "rank_states": rank_states},
                           save_latest=False)
    dist.barrier()
    if dist.get_rank() == 0:
        partial = ckpt_dir / "latest.tmp"
        partial.write_text(tag)
        os.replace(partial, ckpt_dir / "latest")
        _prune_older(ckpt_dir, step, keep)
    dist.barrier()
    return tag


def _prune_older(ckpt_dir: Path, step: int, keep: int) -> None:
    """Delete tags older than the one just saved beyond the newest `keep`; never a newer (unfinished) one."""
    older = sorted(p for p in ckpt_dir.iterdir()
                   if p.is_dir() and TAG_PATTERN.match(p.name) and int(p.name[4:]) <= step)
    for old in older[: max(0, len(older) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag `latest` names (written only after every rank finished its save), or None if no checkpoint."""
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not TAG_PATTERN.match(tag) or not (ckpt_dir / tag).is_dir():
        raise RuntimeError(f"{latest} names {tag!r}, which is not a complete checkpoint in {ckpt_dir}: "
                           "point it at an existing step directory or remove the checkpoints to start over")
    return tag


def load_checkpoint(engine, ckpt_dir: Path) -> dict | None:
    """Restore engine (weights, optimizer, scheduler) from the newest complete checkpoint.

    Returns this rank's view of the client state ({"step", "rank_state", ...}) or None if there is none.
    """
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"checkpoint {ckpt_dir / tag} could not be loaded: delete it to resume from an older one")
    rank_states = client_state.pop("rank_states")
    world = dist.get_world_size()
    if len(rank_states) != world:
        raise RuntimeError(f"checkpoint {ckpt_dir / tag} was written by {len(rank_states)} ranks but this job has "
                           f"{world}: resume with the same world size (the data position is per rank)")
    client_state["rank_state"] = rank_states[dist.get_rank()]
    return client_state
