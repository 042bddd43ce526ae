"""Starting jobs: the rendezvous port on a machine that runs another job, and a start that fails midway.

Real `bash launch/pretrain.sh` jobs (2 CPU ranks, ZeRO-3 over gloo) on the session's synthetic shards.
"""

import os
import re
import socket
from pathlib import Path

import pytest

from tests.helpers.jobs import DEEPSPEED, PORT, REPO, TINY_JOB, check, losses, recipe_flags, run

pytestmark = pytest.mark.slow
INJECTOR = str(Path(__file__).parent / "fault_injection")
ONE_STEP = TINY_JOB | {"schedule.max_steps": 1, "checkpoint.every": 0}


def taken_port() -> socket.socket:
    """A port another job's store listens on."""
    listener = socket.socket()
    listener.bind(("", 0))
    listener.listen()
    return listener


def shm_buffers(port: int) -> list[Path]:
    return list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def test_a_taken_master_port_is_one_error_line_before_any_rank(synthetic_shards, tokenizer_dir, tmp_path):
    with taken_port() as listener:
        port = listener.getsockname()[1]
        proc = run(["bash", "launch/pretrain.sh", *recipe_flags(synthetic_shards, tokenizer_dir, tmp_path, ONE_STEP)],
                   env={"GPUS_PER_NODE": "2", "MASTER_PORT": str(port)}, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert re.findall(r"error: .*", proc.stderr) == [
        f"error: MASTER_PORT={port} is taken on this machine (another job?): unset MASTER_PORT on one node to "
        "pick a free port, or set a free one"]
    assert "spawned" not in proc.stdout + proc.stderr
    assert not (tmp_path / "tiny-synthetic").exists()


def test_a_port_taken_after_the_launcher_checked_it_is_the_same_line_from_rank_0(synthetic_shards, tokenizer_dir,
                                                                                tmp_path):
    """DeepSpeed's launcher started directly (no check of ours before it): rank 0's store cannot bind."""
    with taken_port() as listener:
        port = listener.getsockname()[1]
        proc = run([*DEEPSPEED, "--num_gpus", "2", "--master_port", str(port), "launch/pretrain.sh",
                    *recipe_flags(synthetic_shards, tokenizer_dir, tmp_path, ONE_STEP)], timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert re.findall(r"error: .*", proc.stderr) == [
        f"error: MASTER_PORT={port} is taken on this machine (another job?): unset MASTER_PORT on one node to "
        "pick a free port, or set a free one"]
    assert not shm_buffers(port)


def test_one_node_without_master_port_picks_a_free_one(synthetic_shards, tokenizer_dir, tmp_path, monkeypatch):
    """As torchrun --standalone does: a second job on the machine starts while the default port is held. The
    job is started from another directory by a relative path, as a cluster script may start it."""
    monkeypatch.delenv("MASTER_PORT", raising=False)
    held = socket.socket()
    try:
        held.bind(("", 29500))
        held.listen()
    except OSError:  # someone else holds it already: the case this test is about
        pass
    try:
        script = os.path.relpath(REPO / "launch" / "pretrain.sh", tmp_path)
        proc = check(run(["bash", "-c", f'cd "{tmp_path}" && exec bash "{script}" "$@"', "launcher",
                          *recipe_flags(synthetic_shards, tokenizer_dir, tmp_path, ONE_STEP)],
                         env={"GPUS_PER_NODE": "2"}, timeout=300))
    finally:
        held.close()
    ports = set(re.findall(r"--master_port[= ](\d+)", proc.stdout + proc.stderr))
    assert len(ports) == 1 and ports != {"29500"}, ports
    assert list(losses(tmp_path / "tiny-synthetic")) == [1]
    assert not shm_buffers(int(ports.pop()))


@pytest.mark.parametrize("fault", ["exit_init@0:0", "exit_ds_init@0:0"])
def test_a_failed_start_leaves_no_shm_buffer(synthetic_shards, tokenizer_dir, tmp_path, fault):
    """Rank 0 dies as soon as it has joined the group, or inside DeepSpeed's init. Before, rank 1 went on into
    DeepSpeed's CPU all-reduce set-up, mapped its /dev/shm buffer, spun there waiting for rank 0's, was killed
    and left the buffer (the second case leaked until the name was handed to a process outside the job)."""
    proc = run(["bash", "launch/pretrain.sh", *recipe_flags(synthetic_shards, tokenizer_dir, tmp_path, ONE_STEP)],
               env={"GPUS_PER_NODE": "2", "MASTER_PORT": PORT, "PYTHONPATH": INJECTOR,
                    "VLPRETRAIN_FAULT": fault}, timeout=300, new_session=True)
    assert proc.returncode != 0
    assert "spawned" in proc.stdout + proc.stderr  # the ranks did start
    assert not shm_buffers(proc.port)
