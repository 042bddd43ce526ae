"""A per-rank watchdog: reports a rank that stays in one phase of one step too long.

It only reports (rank, step, phase, seconds, every thread's stack). Ending a hung job is the collective
timeout's work (`dist.timeout_minutes`): the ranks waiting on the stalled one fail after that long, and
the launcher then stops the rest. The report says which rank stopped and where, which the timeout does not.
"""

from __future__ import annotations

import faulthandler
import sys
import threading
import time


class Watchdog:
    def __init__(self, rank: int, stall_seconds: float):
        self.rank, self.stall_seconds = rank, stall_seconds
        self.step, self.phase, self.since = 0, "start-up", time.monotonic()
        self._reported_since = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="vlpretrain-watchdog", daemon=True)

    def __enter__(self) -> Watchdog:
        if self.stall_seconds > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stopped.set()

    def enter(self, phase: str, step: int | None = None) -> None:
        """Mark progress: this rank is now in `phase` of `step` (the step being trained)."""
        if step is not None:
            self.step = step
        self.phase, self.since = phase, time.monotonic()

    def where(self) -> str:
        return f"phase '{self.phase}' of step {self.step}"

    def _watch(self) -> None:
        poll = min(5.0, self.stall_seconds / 4)
        while not self._stopped.wait(poll):
            since = self.since
            stalled = time.monotonic() - since
            if stalled < self.stall_seconds or self._reported_since == since:
                continue
            self._reported_since = since  # once per stall: a hung rank must not flood the log
            print(f"[vlpretrain] watchdog: rank {self.rank} has made no progress for {stalled:.0f} s in "
                  f"{self.where()}; its threads are:", file=sys.stderr, flush=True)
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
