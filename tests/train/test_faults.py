"""Fault injection: real jobs (`bash launch/pretrain.sh`, 2 CPU ranks, ZeRO-3 over gloo), one fault each.

Faults are planted in the ranks by tests/train/fault_injection/sitecustomize.py (see its docstring), so the
launcher, engine, loader and checkpoints are the production code. Every job trains the same 8 steps
(checkpoint every 4) on the same data as the fault-free reference run, so the same seed and world size
must give the very same losses, and a resumed job must continue exactly where its checkpoint left off.
"""

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from data_pipeline import make_train_loader
from tests.helpers.data import write_hostile_shards
from tests.helpers.jobs import check, free_port, logged_rows, losses, run

pytestmark = pytest.mark.slow
STEPS = 8
INJECTOR = str(os.path.join(os.path.dirname(__file__), "fault_injection"))


@pytest.fixture(scope="module")
def job(synthetic_shards, tokenizer_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fault_runs")

    def start(name: str, *flags: str, fault: str | None = None, probe=None, train=None, timeout: int = 300):
        port = free_port()
        env = {"GPUS_PER_NODE": "2", "MASTER_PORT": str(port), "PYTHONPATH": INJECTOR}
        env |= {"VLPRETRAIN_FAULT": fault} if fault else {}
        env |= {"VLPRETRAIN_PROBE": str(probe)} if probe else {}
        cmd = ["bash", "launch/pretrain.sh", "--recipe", "tiny_synthetic", "--name", name,
               "--logging.run_dir", str(root), "--data.train", str(train or synthetic_shards["train"]),
               "--data.val", "null", "--data.tokenizer", str(tokenizer_dir), "--schedule.max_steps", str(STEPS),
               "--schedule.warmup_steps", "2", "--schedule.micro_batch_size", "8", "--logging.every", "1",
               "--checkpoint.every", "4", *flags]  # fmt: skip
        proc = run(cmd, env=env, timeout=timeout, new_session=True)  # its own process group, like a SLURM step
        # DeepSpeed's CPU all-reduce buffers (~70 MB of RAM per rank) must not outlive the job, killed or not
        assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
        return proc

    start.root = root
    return start


@pytest.fixture(scope="module")
def reference(job):
    check(job("reference"))
    return losses(job.root / "reference")


def errors(proc) -> list[str]:
    # ranks share the output: another rank's progress bar may precede an error on the same line
    return re.findall(r"error: .*", proc.stderr)


def checkpoint_files(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step"))


def latest(run_dir) -> str:
    return (run_dir / "checkpoints" / "latest").read_text()


def assert_continues_the_reference(job, name: str, reference: dict, resume_step: int) -> None:
    """Resume `name`; its steps must be logged once each and equal the fault-free run's, bit for bit."""
    resumed = check(job(name, "--resume", "auto"))
    assert f"resume_step={resume_step}" in resumed.stdout
    assert [row["step"] for row in logged_rows(job.root / name)] == list(range(1, STEPS + 1))
    for step, row in losses(job.root / name).items():
        for key in ("loss/total", "loss/itc", "loss/itm", "loss/mlm"):
            assert row[key] == reference[step][key], (name, step, key)


def test_same_seed_and_world_size_give_the_same_losses(job, reference):
    check(job("again"))
    again = losses(job.root / "again")
    assert [again[s]["loss/total"] for s in range(1, STEPS + 1)] == [reference[s]["loss/total"] for s in again]


def test_a_rank_killed_mid_step_ends_the_job_and_resume_loses_nothing_before_the_checkpoint(job, reference):
    proc = job("kill", fault="kill@1:6")
    assert proc.returncode != 0
    (message,) = errors(proc)  # from the surviving rank
    assert "rank 0 lost contact with the other ranks in phase 'forward' of step 6" in message
    assert "Newest complete checkpoint: step 4" in message and "--resume auto" in message
    assert latest(job.root / "kill") == "step00000004"
    assert_continues_the_reference(job, "kill", reference, resume_step=4)


def test_a_checkpoint_interrupted_mid_write_is_never_resumed_from(job, reference):
    proc = job("kill-save", fault="kill_save@0:8")  # rank 0 dies right after writing its first step-8 file
    assert proc.returncode != 0
    assert "in phase 'checkpoint' of step 8" in errors(proc)[0]
    run_dir = job.root / "kill-save"
    assert checkpoint_files(run_dir) == ["step00000004", "step00000008"] and latest(run_dir) == "step00000004"
    assert_continues_the_reference(job, "kill-save", reference, resume_step=4)
    assert latest(run_dir) == "step00000008"  # rewritten whole by the resumed job


def test_disk_full_at_checkpoint_time_is_one_error_and_the_previous_checkpoint_holds(job, reference):
    proc = job("disk-full", fault="disk_full@1:8")
    assert proc.returncode != 0
    failed = [line for line in errors(proc) if "could not be written" in line]
    assert len(failed) == 1 and "rank 1" in failed[0]  # torch's zip writer: "unexpected pos", not an OSError
    assert "step 4" in failed[0] and "is intact" in failed[0]
    assert latest(job.root / "disk-full") == "step00000004"
    assert_continues_the_reference(job, "disk-full", reference, resume_step=4)


@pytest.mark.parametrize(
    ("fault", "signal_name", "stop_step"), [("usr1@0:3", "SIGUSR1", 3), ("term@1:5", "SIGTERM", 5)]
)
def test_a_preemption_signal_checkpoints_and_exits_cleanly(job, reference, fault, signal_name, stop_step):
    # SIGUSR1 goes to the job's whole process group, as SLURM signals every process of a job step (the
    # launchers ignore it); SIGTERM reaches rank 1 alone, and rank 0 must stop at the same step
    name = f"preempted-{signal_name}"
    proc = job(name, fault=fault)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"exiting at step {stop_step} on {signal_name} with a checkpoint" in proc.stdout
    assert not errors(proc) and "Traceback" not in proc.stderr
    assert latest(job.root / name) == f"step{stop_step:08d}"
    assert_continues_the_reference(job, name, reference, resume_step=stop_step)


def test_non_finite_steps_are_skipped_counted_and_bounded(job, tmp_path):
    proc = job("nan", "--optim.max_nonfinite_steps", "3", fault="nan@1:2,5,6,7", probe=tmp_path)
    assert proc.returncode == 1
    (message,) = errors(proc)  # every rank agrees; rank 0 says it once
    assert "steps 5-7" in message and "stopped at step 7" in message
    assert "newest complete checkpoint: step 4" in message
    for rank in (0, 1):  # NaN pixels on rank 1 only; both ranks skip the same steps
        rows = [json.loads(line) for line in (tmp_path / f"rank{rank}.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7]
        assert [r["step"] for r in rows if not r["applied"]] == [2, 5, 6, 7]
        for r in rows:  # a skipped step leaves this rank's parameter partition exactly as it was
            assert (r["before"] == r["after"]) == (not r["applied"]), r
    logged = losses(job.root / "nan")
    assert [logged[s]["train/skipped_steps"] for s in range(1, 8)] == [0, 1, 1, 1, 2, 3, 4]
    assert all(logged[s]["loss/total"] == logged[s]["loss/total"] for s in (1, 3, 4))  # finite again after
    assert logged[6]["train/lr"] == logged[5]["train/lr"]  # nor does the schedule advance


def test_a_hung_rank_is_reported_by_the_watchdog_and_the_collective_timeout_ends_the_job(job):
    # hung as its optimizer step begins: rank 0 waits in ZeRO's gradient-norm all-reduce
    proc = job("hang", "--dist.timeout_minutes", "0.25", "--dist.watchdog_minutes", "0.1", fault="hang@1:3")
    assert proc.returncode != 0  # and it ended: `run` would raise TimeoutExpired on a hang
    report = proc.stderr[proc.stderr.index("watchdog: rank 1 has made no progress for") :].splitlines()[0]
    stacks = job.root / "hang" / "watchdog" / "rank1.txt"
    assert report.endswith(f"in phase 'optimizer step' of step 3; its stacks: {stacks}")
    assert "sitecustomize.py" in stacks.read_text()  # the stack shows where it hangs
    (message,) = errors(proc)
    assert "rank 0 lost contact" in message and "step 3" in message and "Timed out" in message


def test_hostile_shards_are_skipped_counted_and_never_executed(job, synthetic_shards, tokenizer, tmp_path):
    marker = tmp_path / "pickle-was-executed"
    planted = write_hostile_shards(synthetic_shards["train"], tmp_path / "hostile", marker)
    epoch = len(make_train_loader(str(tmp_path / "hostile"), tokenizer, batch_size=8, rank=0, world_size=2,
                                  num_workers=1, seed=0, image_size=64, max_len=32))
    # about a quarter of what each loader worker reads is planted junk: above the default bound of 0.1
    check(job("hostile", "--schedule.max_steps", str(epoch), "--data.max_bad_fraction", "0.3",
              train=tmp_path / "hostile"))
    last = losses(job.root / "hostile")[epoch]
    skipped = {key.removeprefix("data/skipped_"): value for key, value in last.items()
               if key.startswith("data/skipped_") and key != "data/skipped_total"}
    assert skipped == planted
    assert last["data/skipped_total"] == sum(planted.values())
    assert not marker.exists()

    strict = job("hostile-strict", "--data.max_bad_fraction", "0.01", train=tmp_path / "hostile")
    assert strict.returncode != 0
    assert any("max_bad_fraction 0.01" in line for line in errors(strict)), strict.stderr[-3000:]


def test_a_shard_set_with_nothing_usable_is_an_error_not_a_hang(job, synthetic_shards, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(synthetic_shards["train"], broken)
    for shard in broken.glob("*.tar"):
        shard.write_bytes(shard.read_bytes()[:700])  # every tar cut inside its first member
    proc = job("broken", train=broken)
    assert proc.returncode != 0
    assert any("no valid sample" in line for line in errors(proc)), proc.stderr[-3000:]


def test_an_unwritable_run_directory_is_one_error_before_any_rank_starts(job, tmp_path):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    proc = job("unwritable", "--logging.run_dir", str(not_a_directory / "runs"))
    assert proc.returncode == 2 and "spawned" not in proc.stdout + proc.stderr
    (message,) = errors(proc)
    assert "not writable" in message and "--logging.run_dir" in message


def test_resuming_with_another_world_size_is_one_clear_error(job, reference, synthetic_shards, tokenizer_dir):
    proc = run([sys.executable, "-m", "pretrain.train", "--validate-only", "--resume", "auto", "--recipe",
                "tiny_synthetic", "--logging.run_dir", str(job.root), "--name", "reference", "--data.val", "null",
                "--data.train", str(synthetic_shards["train"]), "--data.tokenizer", str(tokenizer_dir)],
               env={"WORLD_SIZE": "1"})  # fmt: skip
    assert proc.returncode == 2
    (message,) = errors(proc)
    assert "was written by 2 ranks but this job has 1" in message
