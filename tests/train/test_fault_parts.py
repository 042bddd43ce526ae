"""The parts of fault handling that need no job: limits, checkpoint checks, the log, watchdog, signals."""

import json
import multiprocessing
import os
import re
import signal
import threading
import time
import types

import pytest
import torch
import torch.distributed as dist

from pretrain.train.checkpoint import (
    CheckpointError,
    check_resumable,
    latest_tag,
    load_checkpoint,
    needs_universal_load,
    newest_checkpoint,
)
from pretrain.train.metrics import TrainLog
from pretrain.train.preflight import check_limits
from pretrain.train.recipe import RecipeError, recipe_from_dict
from pretrain.train.reliability import watchdog as watchdog_module
from pretrain.train.reliability.faults import NonFiniteSteps, RunHalted, is_collective_failure, lost_contact
from pretrain.train.reliability.files import probe_writable
from pretrain.train.reliability.preemption import StopSignals
from pretrain.train.reliability.watchdog import Watchdog
from tests.helpers.ranks import run_on_ranks


@pytest.mark.parametrize(
    ("override", "message"),
    [({"data": {"max_bad_fraction": 1.5}}, "data.max_bad_fraction is 1.5"),
     ({"optim": {"max_nonfinite_steps": -1}}, "optim.max_nonfinite_steps is -1"),
     ({"dist": {"timeout_minutes": 0}}, "dist.timeout_minutes is 0.0: a hung collective must end"),
     ({"dist": {"watchdog_minutes": -2}}, "dist.watchdog_minutes is -2.0"),
     ({"checkpoint": {"keep": 0}}, "checkpoint.keep is 0"),
     ({"schedule": {"grad_accum": 0}}, "schedule.grad_accum is 0: use 1 or more$"),
     ({"schedule": {"max_steps": -1}}, "schedule.max_steps is -1: use 1 or more$"),
     ({"logging": {"every": 0}}, "logging.every is 0: use 1 or more$"),
     ({"eval": {"batch_size": 0}}, "eval.batch_size is 0: use 1 or more$"),
     ({"schedule": {"warmup_steps": -5}}, "schedule.warmup_steps is -5: use 0 or more$")],
)  # fmt: skip
def test_limits_are_checked_before_any_rank_starts(override, message):
    with pytest.raises(RecipeError, match=message):
        check_limits(recipe_from_dict(override))


def make_checkpoint(ckpt_dir, step: int, ranks: int) -> None:
    tag = ckpt_dir / f"step{step:08d}"
    tag.mkdir(parents=True)
    for rank in range(ranks):
        (tag / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").write_bytes(b"x")
        (tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"x")
    (ckpt_dir / "latest").write_text(tag.name)


def test_a_checkpoint_is_checked_against_the_job_before_resuming(tmp_path):
    check_resumable(tmp_path)  # nothing to resume: fine
    assert not needs_universal_load(tmp_path, world_size=2)
    make_checkpoint(tmp_path, 4, ranks=2)
    check_resumable(tmp_path)
    assert newest_checkpoint(tmp_path) == f"step 4 ({tmp_path / 'step00000004'})"
    assert [needs_universal_load(tmp_path, world_size=w) for w in (1, 2, 4)] == [True, False, True]
    for states in (tmp_path / "step00000004").glob("*model_states.pt"):
        states.unlink()
    with pytest.raises(CheckpointError, match="no model states: it is damaged"):
        check_resumable(tmp_path)
    (tmp_path / "latest").write_text("step00000009")  # names a step that is not there
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        latest_tag(tmp_path)
    assert newest_checkpoint(tmp_path).startswith("none yet")


def test_a_checkpoint_file_damaged_inside_is_found_before_loading(one_rank_group, tmp_path):
    # torch.load itself reads such a file without a word: its values are simply wrong
    tag = tmp_path / "step00000004"
    tag.mkdir()
    states = tag / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    torch.save({"weight": torch.arange(1000.0)}, states)
    (tmp_path / "latest").write_text(tag.name)
    damaged = bytearray(states.read_bytes())
    damaged[len(damaged) // 2 : len(damaged) // 2 + 8] = b"\xff" * 8  # inside the tensor's bytes
    states.write_bytes(damaged)

    class Engine:
        def load_checkpoint(self, *args, **kwargs):
            raise AssertionError("a damaged checkpoint reached DeepSpeed's load")

    with pytest.raises(CheckpointError, match=re.escape(
            f"checkpoint {tag} is damaged: {states.name} cannot be read ({states.stem}/data/0 fails its CRC "
            f"check); point {tmp_path / 'latest'} at an older step directory, then continue with --resume auto")):
        load_checkpoint(Engine(), tmp_path)


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


class WatchdogClock:
    """A clock for the watchdog module that moves only when the test says so, and counts the watchdog thread's
    reads of it: one per poll, so a test can wait for the thread to have looked (no sleeps, no timing)."""

    def __init__(self):
        self.now, self.polls, self.changed = 1000.0, 0, threading.Condition()

    def monotonic(self) -> float:
        with self.changed:
            if threading.current_thread() is not threading.main_thread():
                self.polls += 1
                self.changed.notify_all()
            return self.now

    def advance(self, seconds: float) -> None:
        with self.changed:
            self.now += seconds

    def wait_for_polls(self, count: int) -> None:
        """Until the watchdog has read the clock `count` more times: the first of them has been acted on."""
        with self.changed:
            target = self.polls + count
            assert self.changed.wait_for(lambda: self.polls >= target, timeout=120), "the watchdog stopped polling"


def test_the_watchdog_reports_a_stall_once_with_step_phase_and_stack(capfd, tmp_path, monkeypatch):
    clock = WatchdogClock()
    monkeypatch.setattr(watchdog_module, "time", types.SimpleNamespace(monotonic=clock.monotonic,
                                                                       strftime=time.strftime))
    with Watchdog(rank=1, stall_seconds=0.4, report_dir=tmp_path) as watchdog:  # polls every 0.1 s
        watchdog.enter("forward", step=7)
        clock.advance(0.3)
        clock.wait_for_polls(2)
        assert "watchdog:" not in capfd.readouterr().err  # not stalled long enough yet
        clock.advance(0.7)
        clock.wait_for_polls(2)
        report = capfd.readouterr().err
        clock.advance(60)
        clock.wait_for_polls(3)  # the same stall, longer: reported once
        watchdog.enter("backward")
        clock.advance(0.3)
        clock.wait_for_polls(2)  # progress again, not stalled yet
        assert "watchdog:" not in capfd.readouterr().err
        clock.advance(2)
        clock.wait_for_polls(2)  # a new stall: a new report
        again = capfd.readouterr().err
    assert report == f"[vlpretrain] watchdog: rank 1 has made no progress for 1 s in phase 'forward' of step 7; " \
                     f"its stacks: {tmp_path / 'rank1.txt'}\n"
    assert again == f"[vlpretrain] watchdog: rank 1 has made no progress for 2 s in phase 'backward' of step 7; " \
                    f"its stacks: {tmp_path / 'rank1.txt'}\n"
    stacks = (tmp_path / "rank1.txt").read_text()
    assert "phase 'forward' of step 7, 1 s" in stacks and "phase 'backward' of step 7, 2 s" in stacks
    assert "test_the_watchdog_reports_a_stall_once" in stacks  # the main thread's stack, waiting in this test


def _stop_signals_on_two_ranks(rank: int, world: int) -> tuple:
    stop = StopSignals()
    stop.install()
    before = stop.agreed("cpu")
    if rank == 1:
        os.kill(os.getpid(), signal.SIGUSR1)  # this rank alone; would end the process without the handler
    received = stop.received
    return before, received, stop.agreed("cpu")


@pytest.mark.slow
def test_a_stop_signal_on_one_rank_is_seen_by_all(tmp_path):
    results = run_on_ranks(_stop_signals_on_two_ranks, store=tmp_path / "store")
    assert results == {0: (None, 0, "SIGUSR1"), 1: (None, signal.SIGUSR1, "SIGUSR1")}


def _probe_many_times(directory) -> None:
    for _ in range(200):
        probe_writable(directory)


def test_ranks_probing_one_directory_at_once_do_not_trip_each_other(tmp_path):
    # every rank runs preflight and the checkpoint probe at the same moment, in the same directory
    with multiprocessing.get_context("fork").Pool(4) as pool:
        pool.map(_probe_many_times, [tmp_path] * 4)
    assert list(tmp_path.iterdir()) == []  # and no probe is left behind
