"""The private torch / DeepSpeed internals behind pretrain/compat.py still behave as assumed. A failure
here after an upgrade names the assumption that broke; fix compat.py and widen its TESTED range."""

import datetime

import deepspeed
import pytest
import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout

from pretrain import compat
from pretrain.distributed import apply_collective_timeout
from tests.helpers.ranks import run_on_ranks, start_deepspeed


def test_the_installed_versions_are_the_checked_ones():
    assert compat.untested_versions({"torch": torch.__version__, "deepspeed": deepspeed.__version__}) == []


def test_versions_outside_the_checked_range_are_named():
    assert compat.untested_versions({"torch": "2.14.0+cu128", "deepspeed": "0.19.8"}) == [
        "torch 2.14.0+cu128 (checked: 2.3-2.13)"]
    assert compat.untested_versions({"torch": "2.2.1", "deepspeed": "0.15.0"}) == ["torch 2.2.1 (checked: 2.3-2.13)"]


def test_every_process_group_gets_the_collective_timeout(one_rank_group):
    def timeouts() -> list[datetime.timedelta]:
        return [group._get_backend(torch.device("cpu")).options._timeout for group in compat.process_groups()]

    configured = datetime.timedelta(seconds=15)
    group = dist.new_group(ranks=[0])  # as DeepSpeed clones the world group: it gets torch's default, not ours
    assert group in compat.process_groups() and len(compat.process_groups()) == 2
    assert default_pg_timeout in timeouts()
    apply_collective_timeout(configured)
    assert timeouts() == [configured, configured]


def _buffer_lifecycle(rank: int, world: int, store: str) -> tuple[bool, bool]:
    start_deepspeed(rank, world, store, keep_shm_buffers=True)
    dist.barrier()  # every rank has created its buffer
    created = all(compat.deepspeed_shm_buffer(r).exists() for r in range(world))
    compat.release_deepspeed_shm_buffers()
    dist.barrier()
    released = not any(compat.deepspeed_shm_buffer(r).exists() for r in range(world))
    return created, released


@pytest.mark.slow
def test_deepspeed_cpu_all_reduce_buffers_have_the_assumed_names_and_are_released(tmp_path):
    results = run_on_ranks(_buffer_lifecycle, store=tmp_path / "store", init_group=False)
    assert results == {0: (True, True), 1: (True, True)}
