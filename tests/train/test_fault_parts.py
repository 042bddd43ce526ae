"""The parts of fault handling that need no job: limits, checkpoint checks, the log, watchdog, signals."""

import json
import multiprocessing
import os
import signal
import time

import pytest
import torch.distributed as dist

from pretrain.train.checkpoint import CheckpointError, check_resumable, latest_tag, newest_checkpoint
from pretrain.train.metrics import TrainLog
from pretrain.train.preflight import check_fault_limits
from pretrain.train.recipe import RecipeError, recipe_from_dict
from pretrain.train.reliability.faults import NonFiniteSteps, RunHalted, is_collective_failure, lost_contact
from pretrain.train.reliability.files import probe_writable
from pretrain.train.reliability.preemption import StopSignals
from pretrain.train.reliability.watchdog import Watchdog


@pytest.mark.parametrize(
    ("override", "message"),
    [({"data": {"max_bad_fraction": 1.5}}, "data.max_bad_fraction is 1.5"),
     ({"optim": {"max_nonfinite_steps": -1}}, "optim.max_nonfinite_steps is -1"),
     ({"dist": {"timeout_minutes": 0}}, "dist.timeout_minutes is 0.0: a hung collective must end"),
     ({"dist": {"watchdog_minutes": -2}}, "dist.watchdog_minutes is -2.0"),
     ({"checkpoint": {"keep": 0}}, "checkpoint.keep is 0")],
)  # fmt: skip
def test_fault_limits_are_checked_before_any_rank_starts(override, message):
    with pytest.raises(RecipeError, match=message):
        check_fault_limits(recipe_from_dict(override))


def make_checkpoint(ckpt_dir, step: int, ranks: int) -> None:
    tag = ckpt_dir / f"step{step:08d}"
    tag.mkdir(parents=True)
    for rank in range(ranks):
        (tag / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").write_bytes(b"x")
        (tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"x")
    (ckpt_dir / "latest").write_text(tag.name)


def test_a_checkpoint_is_checked_against_the_job_before_resuming(tmp_path):
    check_resumable(tmp_path, world_size=2)  # nothing to resume: fine
    make_checkpoint(tmp_path, 4, ranks=2)
    check_resumable(tmp_path, world_size=2)
    assert newest_checkpoint(tmp_path) == f"step 4 ({tmp_path / 'step00000004'})"
    with pytest.raises(CheckpointError, match="written by 2 ranks but this job has 4"):
        check_resumable(tmp_path, world_size=4)
    for states in (tmp_path / "step00000004").glob("*model_states.pt"):
        states.unlink()
    with pytest.raises(CheckpointError, match="no model states: it is damaged"):
        check_resumable(tmp_path, world_size=2)
    (tmp_path / "latest").write_text("step00000009")  # names a step that is not there
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        latest_tag(tmp_path)
    assert newest_checkpoint(tmp_path).startswith("none yet")


def test_a_line_torn_by_a_crash_does_not_break_the_resumed_log(tmp_path):
    rows = [json.dumps({"step": s, "loss/total": 1.0 / s}) for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + '\n{"step": 4, "loss/to')
    log = TrainLog(tmp_path, enabled=True, resume_step=2)
    log.scalars(3, {"loss/total": 0.5})
    log.close()
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(row["step"], row["loss/total"]) for row in kept] == [(1, 1.0), (2, 0.5), (3, 0.5)]


def test_non_finite_steps_stop_the_run_after_the_limit_in_a_row():
    guard = NonFiniteSteps(limit=3, newest_checkpoint=lambda: "step 4 (x)", announce=False)
    for step, applied in enumerate([True, False, False, True, False, False], start=1):
        guard.update(applied, step)
    with pytest.raises(RunHalted, match="steps 5-7 all had a non-finite .* checkpoint: step 4 \\(x\\)") as halted:
        guard.update(False, 7)
    assert halted.value.agreed
    NonFiniteSteps(limit=0, newest_checkpoint=str, announce=False).update(False, 1)  # 0: never stops


def test_collective_failures_are_told_apart_from_other_errors():
    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                        "[127.0.0.1]:39817. This is typically caused by a remote worker crashing.")
    assert is_collective_failure(gloo) and is_collective_failure(dist.DistBackendError("NCCL watchdog"))
    assert not is_collective_failure(RuntimeError("CUDA out of memory"))
    assert not is_collective_failure(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos"))
    message = str(lost_contact(gloo, 3, "phase 'backward' of step 12", "step 10 (x)"))
    assert message.startswith("rank 3 lost contact with the other ranks in phase 'backward' of step 12 "
                              "(Connection closed by peer [127.0.0.1]:39817)")


def test_the_watchdog_reports_a_stall_once_with_step_phase_and_stack(capfd, tmp_path):
    with Watchdog(rank=1, stall_seconds=0.4, report_dir=tmp_path) as watchdog:
        watchdog.enter("forward", step=7)
        time.sleep(1.5)  # one stall, several polls
        watchdog.enter("backward")
        time.sleep(0.2)  # progress again: no new report
    report = capfd.readouterr().err
    assert report.count("watchdog:") == 1
    assert f"watchdog: rank 1 has made no progress for 1 s in phase 'forward' of step 7; its stacks: {tmp_path}" \
        in report.replace("for 0 s", "for 1 s")
    stacks = (tmp_path / "rank1.txt").read_text()
    assert "phase 'forward' of step 7" in stacks and "test_the_watchdog_reports_a_stall_once" in stacks


def test_a_stop_signal_on_one_rank_is_seen_by_all(one_rank_group):
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        stop = StopSignals()
        stop.install()
        assert stop.agreed("cpu") is None
        os.kill(os.getpid(), signal.SIGUSR1)  # would end the process without the handler
        assert stop.agreed("cpu") == "SIGUSR1"
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _probe_many_times(directory) -> None:
    for _ in range(200):
        probe_writable(directory)


def test_ranks_probing_one_directory_at_once_do_not_trip_each_other(tmp_path):
    # every rank runs preflight and the checkpoint probe at the same moment, in the same directory
    with multiprocessing.get_context("fork").Pool(4) as pool:
        pool.map(_probe_many_times, [tmp_path] * 4)
    assert list(tmp_path.iterdir()) == []  # and no probe is left behind
