"""The private torch and DeepSpeed internals this project relies on, in one place.

Each is an assumption about a version's internals, checked here against the versions it was written
and tested for (`tests/test_compat.py` fails when an upgrade breaks one):
- torch keeps every process group in `distributed_c10d._world.pg_map` and can change a group's timeout
  after creation with `distributed_c10d._set_pg_timeout` (DeepSpeed makes groups of its own that we
  cannot pass a timeout to);
- DeepSpeed's CPU all-reduce, when every rank is on one machine (LOCAL_SIZE = world size), names its per-rank buffer
  `deepspeed_allreduce_buffer_<uid>_<master addr>_<master port>_<rank>` in /dev/shm and never unlinks it;
- torch's JIT extension build (DeepSpeed builds its CPU ops that way) takes a `lock` file in the op's build
  directory and waits, with no timeout, while it exists.
"""

from __future__ import annotations

import os
import subprocess
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import IO

import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d
from torch.utils.cpp_extension import get_default_build_root

TESTED = {"torch": ("2.3", "2.13"), "deepspeed": ("0.15", "0.19")}


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def untested_versions(versions: dict[str, str]) -> list[str]:
    """The packages whose version lies outside the range these internals were checked on."""
    return [f"{name} {version} (checked: {TESTED[name][0]}-{TESTED[name][1]})" for name, version in versions.items()
            if not _major_minor(TESTED[name][0]) <= _major_minor(version) <= _major_minor(TESTED[name][1])]


def warn_if_untested() -> None:
    import deepspeed
    import torch

    untested = untested_versions({"torch": torch.__version__, "deepspeed": deepspeed.__version__})
    if untested:
        warnings.warn(f"pretrain.compat relies on private internals checked on other versions than {untested}; "
                      "run tests/test_compat.py", stacklevel=2)


def process_groups() -> list:
    """Every process group this process belongs to, DeepSpeed's own included."""
    return [group for group in c10d._world.pg_map if not c10d._rank_not_in_group(group)]


def set_group_timeout(group, timeout: timedelta) -> None:
    c10d._set_pg_timeout(timeout, group)


def deepspeed_shm_buffer(rank: int) -> Path:
    """The /dev/shm name of `rank`'s DeepSpeed CPU all-reduce buffer in this job."""
    parts = ("deepspeed_allreduce_buffer", os.getuid(), os.environ.get("MASTER_ADDR", ""),
             os.environ.get("MASTER_PORT", ""), rank)
    return Path("/dev/shm", "_".join(map(str, parts)))


def unlink_when_closed(path: Path) -> IO[bytes]:
    """A pipe whose closing removes `path`: closed by this process, or by the kernel when it dies (SIGKILL
    included). A background shell outside this process's tree does it, as a launcher kills a failed job's
    process trees and a rank spinning inside DeepSpeed's init never returns to Python to clean up."""
    # an asynchronous list's stdin is /dev/null: the pipe goes to it as fd 3
    watch = 'exec 3<&0; (trap "" HUP INT TERM; cat <&3; rm -f "$1") >/dev/null 2>&1 &'
    shell = subprocess.Popen(["sh", "-c", watch, "sh", str(path)], stdin=subprocess.PIPE)
    shell.wait()  # returns at once; the background subshell holds the pipe's read end
    return shell.stdin


def release_deepspeed_shm_buffers() -> None:
    """Unlink this rank's buffer name once every rank has mapped every buffer (the barrier: init has
    returned everywhere); the mappings last as long as the processes and end with them, kill -9 included."""
    dist.barrier()
    deepspeed_shm_buffer(dist.get_rank()).unlink(missing_ok=True)


def stale_extension_locks(max_age_s: float = 1800.0) -> list[Path]:
    """Build locks older than `max_age_s` under torch's extension root: a build killed midway leaves its lock,
    and every later job that loads that op waits on it forever (a build takes minutes, not half an hour)."""
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    now = time.time()
    return sorted(lock for pattern in ("*/lock", "*/*/lock") for lock in root.glob(pattern)
                  if now - lock.stat().st_mtime > max_age_s)
