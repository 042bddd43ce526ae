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
import signal
import tempfile
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import make_train_loader
from tests.helpers.data import write_hostile_shards
from tests.helpers.jobs import PORT, TINY_JOB, check, logged_rows, losses, recipe_flags, run

pytestmark = pytest.mark.slow
STEPS = TINY_JOB["schedule.max_steps"]
INJECTOR = str(os.path.join(os.path.dirname(__file__), "fault_injection"))


@pytest.fixture(scope="module")
def job(synthetic_shards, tokenizer_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fault_runs")

    def start(name: str, *flags: str, fault: str | None = None, probe=None, train=None, timeout: int = 300):
        shm_probe = tempfile.mkdtemp(dir=root, prefix=f"shm-{name}-")
        env = {"GPUS_PER_NODE": "2", "MASTER_PORT": PORT, "PYTHONPATH": INJECTOR, "VLPRETRAIN_SHM_PROBE": shm_probe}
        env |= {"VLPRETRAIN_FAULT": fault} if fault else {}
        env |= {"VLPRETRAIN_PROBE": str(probe)} if probe else {}
        flags = recipe_flags(synthetic_shards, tokenizer_dir, root, TINY_JOB,
                             {"name": name, "data.train": train or synthetic_shards["train"]}) + list(flags)
        proc = run(["bash", "launch/pretrain.sh", *flags], env=env, timeout=timeout, new_session=True)  # its own
        # process group, like a SLURM step. DeepSpeed's CPU all-reduce buffers (~70 MB of RAM per rank) must not
        # outlive the job, killed or not: each rank's existed under pretrain.compat's name, and none is left.
        buffers = {int(p.stem[4:]): json.loads(p.read_text()) for p in Path(shm_probe).glob("rank*.json")}
        if "spawned" in proc.stdout + proc.stderr:  # the ranks started
            assert sorted(buffers) == [0, 1] and all(b["existed"] for b in buffers.values()), buffers
        assert not any(Path(b["buffer"]).exists() for b in buffers.values())
        assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{proc.port}_*"))
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


def tensorboard_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of every event of `tag`, as TensorBoard shows them (purged steps left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def assert_continues_the_reference(job, name: str, reference: dict, resume_step: int) -> None:
    """Resume `name`; its steps must be logged once each and equal the fault-free run's, bit for bit."""
    resumed = check(job(name, "--resume", "auto"))
    assert f"resume_step={resume_step}" in resumed.stdout
    assert [row["step"] for row in logged_rows(job.root / name)] == list(range(1, STEPS + 1))
    for step, row in losses(job.root / name).items():
        for key in ("loss/total", "loss/itc", "loss/itm", "loss/mlm"):
            assert row[key] == reference[step][key], (name, step, key)
    # TensorBoard too: what the interrupted job logged after its checkpoint is purged, every step shows once
    expected = [(step, float(np.float32(reference[step]["loss/total"]))) for step in range(1, STEPS + 1)]
    assert tensorboard_scalars(job.root / name, "loss/total") == expected


def test_same_seed_and_world_size_give_the_same_losses(job, reference):
    check(job("again"))
    again = losses(job.root / "again")
    assert [again[s]["loss/total"] for s in range(1, STEPS + 1)] == [reference[s]["loss/total"] for s in again]


def test_a_rank_killed_mid_step_ends_the_job_and_resume_loses_nothing_before_the_checkpoint(job, reference):
    proc = job("kill", fault="kill@1:6")
    # DeepSpeed's launcher polls its ranks once a second and exits with the first failed rank's status it sees:
    # 247 (the killed rank's -9) or 1 (the surviving rank's, when it has ended by then and is polled first)
    assert proc.returncode in (247, 1), proc.stdout[-3000:]
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


def test_an_unwritable_checkpoint_directory_on_one_rank_stops_every_rank_with_one_line(job):
    proc = job("no-write", fault="no_write@1:8")  # rank 1 alone can write no file as the step-8 checkpoint begins
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    ckpt = job.root / "no-write" / "checkpoints"
    # every rank stops at the write probe with the same error (rank 0 says it): none starts writing step 8,
    # so none waits in DeepSpeed's save for a rank that is gone ("lost contact")
    (message,) = errors(proc)
    assert re.fullmatch(
        rf"error: checkpoint step00000008 could not be written to {re.escape(str(ckpt))} \(rank 1: \[Errno 27\] "
        rf"File too large; [0-9.]+ GiB free there\); the newest complete checkpoint, step 4 "
        rf"\({re.escape(str(ckpt / 'step00000004'))}\), is intact\. Free space or fix the directory \(the "
        rf"incomplete {re.escape(str(ckpt / 'step00000008'))} can go\), then continue with --resume auto",
        message), message
    assert checkpoint_files(ckpt.parent) == ["step00000004"] and latest(ckpt.parent) == "step00000004"


def test_a_corrupt_checkpoint_file_is_one_clear_error(job, reference):
    run_dir = job.root / "corrupt"
    shutil.copytree(job.root / "reference", run_dir)
    damaged = run_dir / "checkpoints" / "step00000008" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # e.g. a copy cut short
    proc = job("corrupt", "--resume", "auto")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (message,) = errors(proc)
    assert message == (
        f"error: checkpoint {damaged.parent} is damaged: {damaged.name} cannot be read (File is not a zip file); "
        f"point {run_dir / 'checkpoints' / 'latest'} at an older step directory, then continue with --resume auto")


@pytest.mark.parametrize(
    ("fault", "signal_name", "stop_step"), [("usr1@0:3", "SIGUSR1", 3), ("term@1:5", "SIGTERM", 5)]
)
def test_a_preemption_signal_to_every_process_checkpoints_and_exits_cleanly(job, reference, fault, signal_name,
                                                                             stop_step):
    # sent by a rank to the job's whole process group, as SLURM signals every process of a job step: the
    # launchers, the ranks and their DataLoader workers, each at its own moment; the ranks agree on the step
    name = f"preempted-{signal_name}"
    proc = job(name, fault=fault)
    stopped = f"exiting at step {stop_step} on {signal_name} with a checkpoint"
    assert stopped in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not errors(proc) and "Traceback" not in proc.stderr
    if signal_name == "SIGUSR1":
        assert proc.returncode == 0  # the launchers ignore it
    else:  # DeepSpeed's runner ends on it at once; its launcher passes it on and waits for the ranks to finish
        assert proc.returncode == -signal.SIGTERM
        assert proc.stdout.index(stopped) < proc.stdout.index("Main process received SIGTERM, exiting")
    assert latest(job.root / name) == f"step{stop_step:08d}"
    assert_continues_the_reference(job, name, reference, resume_step=stop_step)


def test_a_stop_signal_that_reaches_one_rank_stops_every_rank_at_the_same_step(job):
    proc = job("preempted-one-rank", fault="term_self@1:5")  # rank 1 alone, the launchers never see it
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exiting at step 5 on SIGTERM with a checkpoint" in proc.stdout  # said by rank 0, never signalled
    assert not errors(proc) and "Traceback" not in proc.stderr
    assert latest(job.root / "preempted-one-rank") == "step00000005"


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
    stacks = job.root / "hang" / "watchdog" / "rank1.txt"
    # on a busy machine a slow start-up may be reported too (after 6 s here): look for the hang's report
    # (ranks write concurrently: another line may run on after a report's end)
    reports = re.findall(r"watchdog: rank 1 has made no progress for \d+ s in (.*)", proc.stderr)
    hang = f"phase 'optimizer step' of step 3; its stacks: {stacks}"
    assert any(report.startswith(hang) for report in reports), reports
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
