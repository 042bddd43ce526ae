"""Checkpoints through DeepSpeed's save/load, with everything a resume needs in client_state.

DeepSpeed writes `client_state` only from data-parallel rank 0, so per-rank state (loader position, RNG)
is gathered from every rank first and stored as a list indexed by rank. That state lives inside the tag's
files, so it is complete exactly when the tag is: a tag counts once our `latest` names it, which is
written after every rank finished writing (a crash mid-save leaves `latest` on the previous tag).

Another number of ranks resumes through DeepSpeed's universal checkpoint: rank 0 converts the tag once
(`ds_to_universal`, into `<tag>/universal/`), and an engine built with `load_universal` loads it; the
loader continues from the saved global sample position (`TrainLoader.load_state_dict_from_ranks`).
"""

from __future__ import annotations

import random
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pretrain.train.reliability.faults import RunHalted, is_collective_failure
from pretrain.train.reliability.files import probe_writable, replace_text

TAG_PATTERN = re.compile(r"^step(\d{8})$")
MODEL_STATES = "*model_states.pt"  # one per rank under ZeRO-3, one in all otherwise
OPTIMIZER_SHARDS = "*zero_pp_rank_*_optim_states.pt"  # one per data-parallel rank under ZeRO
UNIVERSAL = "universal"  # a tag's universal copy (inside it, so it is pruned with it), for a resume on other ranks


class CheckpointError(RunHalted):
    """A checkpoint cannot be written or read; the message says which, why, and what still holds."""


def checkpoint_tag(step: int) -> str:
    return f"step{step:08d}"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def rng_state_globals() -> list:
    """What `rng_state()`'s numpy state unpickles through: for torch.load(weights_only=True) of model states."""
    return [np.zeros(0).__reduce__()[0], np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(engine, ckpt_dir: Path, step: int, rank_state: dict, keep: int, without_frozen: bool = False
                    ) -> str:
    """All ranks call this. Returns the tag written; prunes to the newest `keep` tags. `without_frozen`: leave
    frozen parameters out (a fine-tuning run's base, which it loads from the base itself).

    A failed write (disk full, permissions) is a CheckpointError naming the checkpoint that still holds.
    """
    rank_states = [None] * dist.get_world_size()
    dist.all_gather_object(rank_states, rank_state)
    tag = checkpoint_tag(step)
    _prepare_directory(ckpt_dir, tag)
    # DeepSpeed's own `latest` is written by rank 0 with a plain write and no barrier after the other
    # ranks' shards; ours is written once every rank has finished, and replaced atomically.
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step, "rank_states": rank_states},
                               save_latest=False, exclude_frozen_parameters=without_frozen)
    except Exception as err:  # OSError, or torch's zip writer on a full disk: "RuntimeError: ... unexpected pos"
        if is_collective_failure(err):
            raise
        # the other ranks then fail at DeepSpeed's closing barrier, on losing this one
        raise _write_failed(ckpt_dir, tag, f"rank {dist.get_rank()}: {err}") from None
    dist.barrier()
    if dist.get_rank() == 0:
        replace_text(ckpt_dir / "latest", tag)
        _prune_older(ckpt_dir, step, keep)
    dist.barrier()
    return tag


def _prepare_directory(ckpt_dir: Path, tag: str) -> None:
    """Check on every rank that the directory takes a file, agreeing on the outcome so all ranks stop
    together on an unwritable directory; and clear an incomplete earlier attempt at the same tag."""
    rank = dist.get_rank()
    error = None
    try:
        probe_writable(ckpt_dir)
        if rank == 0 and (ckpt_dir / tag).is_dir() and _named_tag(ckpt_dir) != tag:
            shutil.rmtree(ckpt_dir / tag)  # left by a crash mid-save: never named by `latest`
    except OSError as err:
        error = f"rank {rank}: {err}"
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    failed = next((e for e in errors if e is not None), None)
    if failed:
        raise _write_failed(ckpt_dir, tag, failed, agreed=True)


def _write_failed(ckpt_dir: Path, tag: str, reason: str, agreed: bool = False) -> CheckpointError:
    free = shutil.disk_usage(ckpt_dir).free / 2**30 if ckpt_dir.is_dir() else 0.0
    return CheckpointError(
        f"checkpoint {tag} could not be written to {ckpt_dir} ({reason}; {free:.1f} GiB free there); the newest "
        f"complete checkpoint, {newest_checkpoint(ckpt_dir)}, is intact. Free space or fix the directory (the "
        f"incomplete {ckpt_dir / tag} can go), then continue with --resume auto", agreed=agreed)


def _prune_older(ckpt_dir: Path, step: int, keep: int) -> None:
    """Delete tags older than the one just saved beyond the newest `keep`; never a newer (unfinished) one."""
    older = sorted(p for p in ckpt_dir.iterdir()
                   if p.is_dir() and TAG_PATTERN.match(p.name) and int(p.name[4:]) <= step)
    for old in older[: max(0, len(older) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


def _named_tag(ckpt_dir: Path) -> str | None:
    latest = ckpt_dir / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag `latest` names (written only after every rank finished its save), or None if no checkpoint."""
    tag = _named_tag(ckpt_dir)
    if tag is None:
        return None
    if not TAG_PATTERN.match(tag) or not (ckpt_dir / tag).is_dir():
        raise CheckpointError(f"{ckpt_dir / 'latest'} names {tag!r}, which is not a complete checkpoint in "
                              f"{ckpt_dir}: point it at an existing step directory or remove the checkpoints "
                              "to start over")
    return tag


def newest_checkpoint(ckpt_dir: Path) -> str:
    """The newest complete checkpoint, for messages."""
    try:
        tag = latest_tag(ckpt_dir)
    except CheckpointError:
        tag = None
    return f"step {int(tag[4:])} ({ckpt_dir / tag})" if tag else f"none yet in {ckpt_dir} (a restart begins at step 0)"


def check_resumable(ckpt_dir: Path) -> None:
    """Before any rank starts: the checkpoint `latest` names has its model states."""
    tag = latest_tag(ckpt_dir)
    if tag is not None and not any((ckpt_dir / tag).glob(MODEL_STATES)):
        raise CheckpointError(f"checkpoint {ckpt_dir / tag} has no model states: it is damaged; point "
                              f"{ckpt_dir / 'latest'} at an older step directory")


def needs_universal_load(ckpt_dir: Path, world_size: int) -> bool:
    """Whether the newest checkpoint's ZeRO optimizer shards were written by another number of ranks."""
    tag = latest_tag(ckpt_dir)
    shards = len(list((ckpt_dir / tag).glob(OPTIMIZER_SHARDS))) if tag else 0
    return shards not in (0, world_size)


def _universal_copy(files: Path) -> None:
    """Rank 0 converts the tag with DeepSpeed's ds_to_universal, into a temporary folder renamed when
    complete (an interrupted conversion is started over); every rank waits for it."""
    target = files / UNIVERSAL
    if dist.get_rank() == 0 and not target.is_dir():
        partial = files / f"{UNIVERSAL}.tmp"
        shutil.rmtree(partial, ignore_errors=True)
        proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                               str(files), "--output_folder", str(partial), "--num_extract_workers", "1",
                               "--num_merge_workers", "1"], capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise CheckpointError(f"checkpoint {files} could not be converted for another number of ranks "
                                  f"(ds_to_universal: {last}): resume with as many ranks as wrote it")
        partial.rename(target)
    dist.barrier()


def _check_intact(ckpt_dir: Path, tag: str) -> None:
    """Every rank reads its share of the tag's files (each file is read by one rank) as the zip archives torch
    writes, checking every member's CRC, and all ranks agree on the outcome: a damaged file (cut short,
    overwritten) stops every rank with one line, before DeepSpeed's load fails on one rank with a traceback
    while the others wait for it. Reads the files once more; the load that follows finds them in the page cache."""
    rank, world = dist.get_rank(), dist.get_world_size()
    damage = None
    for path in sorted((ckpt_dir / tag).glob("*.pt"))[rank::world]:
        try:
            with zipfile.ZipFile(path) as archive:
                bad_member = archive.testzip()
            if bad_member:
                damage = f"{path.name} cannot be read ({bad_member} fails its CRC check)"
        except (OSError, zipfile.BadZipFile) as err:
            damage = f"{path.name} cannot be read ({err})"
        if damage:
            break
    damages = [None] * world
    dist.all_gather_object(damages, damage)
    damage = next((d for d in damages if d), None)
    if damage:
        raise CheckpointError(f"checkpoint {ckpt_dir / tag} is damaged: {damage}; point {ckpt_dir / 'latest'} at "
                              "an older step directory, then continue with --resume auto", agreed=True)


def load_checkpoint(engine, ckpt_dir: Path, without_frozen: bool = False) -> dict | None:
    """Restore engine (weights, optimizer, scheduler) from the newest complete checkpoint (`without_frozen`: one
    saved without frozen parameters, which keep the values they have).

    Returns the client state ({"step", "rank_states": every saving rank's state}) or None if there is none.
    """
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    _check_intact(ckpt_dir, tag)
    if engine.load_universal_checkpoint():  # built so when needs_universal_load
        _universal_copy(ckpt_dir / tag)
        path, client_state = engine.load_checkpoint(str(ckpt_dir / tag), tag=UNIVERSAL,
                                                    load_module_strict=not without_frozen)
    else:
        path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=not without_frozen)
    if path is None:
        raise CheckpointError(f"checkpoint {ckpt_dir / tag} could not be loaded: delete it to resume from an older one")
    return client_state
