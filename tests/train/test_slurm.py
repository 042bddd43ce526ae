"""`launch/slurm.sbatch` submitted for real: a finished job, `scancel --signal=USR1` with and without `--batch`,
and `scontrol requeue`. Skipped where no SLURM cluster answers (CI); `sudo bash launch/slurm_dev_cluster.sh
start` brings up a one-node cluster on a developer machine. Jobs ask for 2 CPUs: 2 CPU ranks of the tiny recipe."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.jobs import REPO, TINY_JOB, logged_rows, recipe_flags


def _cluster_answers() -> bool:
    if not shutil.which("sbatch"):
        return False
    proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return proc.returncode == 0 and any(state in proc.stdout for state in ("idle", "mix", "alloc"))


pytestmark = [pytest.mark.slow, pytest.mark.skipif(not _cluster_answers(), reason="no SLURM cluster answers here")]


def submit(tmp_path: Path, *overrides: dict, shards, tokenizer_dir) -> str:
    """sbatch the real script from the repository root; the job's temporary files go to tmp_path/tmp."""
    (tmp_path / "tmp").mkdir(exist_ok=True)
    flags = recipe_flags(shards, tokenizer_dir, tmp_path, TINY_JOB, {"checkpoint.every": 0}, *overrides)
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path / "tmp")}
    proc = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=2", f"--output={tmp_path}/%x-%j.out",
                           f"--chdir={REPO}", "launch/slurm.sbatch", *flags], env=env, capture_output=True,
                          text=True, check=True)
    return proc.stdout.strip().split(";")[0]


def job_state(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for(condition, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(2)
    return value


def finished(job: str) -> dict[str, str]:
    return wait_for(lambda: (state := job_state(job)).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED")
                    and state)


def steps_logged(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [row["step"] for row in map(json.loads, lines) if "loss/total" in row]


def job_log(tmp_path: Path, job: str) -> str:
    return (tmp_path / f"vlpretrain-{job}.out").read_text()


def test_a_job_runs_as_written_and_leaves_no_hostfile(synthetic_shards, tokenizer_dir, tmp_path):
    job = submit(tmp_path, {"schedule.max_steps": 3}, shards=synthetic_shards, tokenizer_dir=tokenizer_dir)
    state = finished(job)
    log = job_log(tmp_path, job)
    assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    assert f"[slurm.sbatch] job {job} (restart 0) on 1 node(s) x 2 ranks, port {20000 + int(job) % 20000}" in log
    assert "world_size=2 " in log
    assert f"[slurm.sbatch] done at step 3; exported to {tmp_path / 'tiny-synthetic' / 'export'}" in log
    assert steps_logged(tmp_path / "tiny-synthetic") == [1, 2, 3]
    assert not list((tmp_path / "tmp").glob("tmp.*")) and not list((REPO / "runs").glob("hostfile-*"))  # mktemp's


@pytest.mark.parametrize("to", [["--batch"], []])  # the batch shell passes it on; without: every step's process
def test_usr1_checkpoints_and_exits_0(synthetic_shards, tokenizer_dir, tmp_path, to):
    job = submit(tmp_path, {"schedule.max_steps": 200}, shards=synthetic_shards, tokenizer_dir=tokenizer_dir)
    wait_for(lambda: steps_logged(tmp_path / "tiny-synthetic"))
    subprocess.run(["scancel", "--signal=USR1", *to, job], check=True)
    state = finished(job)
    log = job_log(tmp_path, job)
    assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    # no task died of the signal: srun would end the step then, and kill a checkpoint taking over KillWait
    assert "srun: error" not in log, log[-3000:]
    (stopped,) = re.findall(r"\[slurm.sbatch\] exiting at step (\d+) on SIGUSR1 with a checkpoint", log)
    assert 1 <= int(stopped) < 200
    assert (tmp_path / "tiny-synthetic" / "checkpoints" / "latest").read_text() == f"step{int(stopped):08d}"


def test_a_requeued_job_resumes_where_it_stopped(synthetic_shards, tokenizer_dir, tmp_path):
    steps = 12
    job = submit(tmp_path, {"schedule.max_steps": steps}, shards=synthetic_shards, tokenizer_dir=tokenizer_dir)
    wait_for(lambda: len(steps_logged(tmp_path / "tiny-synthetic")) >= 2)
    subprocess.run(["scontrol", "requeue", job], check=True)
    wait_for(lambda: job_state(job).get("Restarts") == "1")
    state = finished(job)
    log = job_log(tmp_path, job)  # both attempts: the output file is opened for appending
    assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    assert "(restart 0)" in log and "(restart 1)" in log
    (stopped,) = re.findall(r"\[slurm.sbatch\] exiting at step (\d+) on SIGTERM with a checkpoint", log)
    assert f"resume_step={stopped} " in log
    assert f"[slurm.sbatch] done at step {steps}" in log
    assert [row["step"] for row in logged_rows(tmp_path / "tiny-synthetic") if "loss/total" in row] \
        == list(range(1, steps + 1))
