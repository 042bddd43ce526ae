"""A per-rank watchdog: reports a rank that stays in one phase of one step too long.

It only reports: one line per stalled rank (rank, step, phase, seconds) and every thread's stack in
`<run>/watchdog/rank<r>.txt` (hundreds of ranks must not flood the log with stacks). Ranks that wait in a
collective for a stalled one stall too; the stacks tell the waiting from the stuck. Ending a hung job is
the collective timeout's work (`dist.timeout_minutes`): the ranks waiting on the stalled one fail after
that long, and the launcher then stops the rest.
"""

from __future__ import annotations

import faulthandler
import sys
import threading
import time
from pathlib import Path


class Watchdog:
    def __init__(self, rank: int, stall_seconds: float, report_dir: Path):
        self.rank, self.stall_seconds = rank, stall_seconds
        self.stacks = report_dir / f"rank{rank}.txt"
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
            self.stacks.parent.mkdir(parents=True, exist_ok=True)
            with open(self.stacks, "a") as out:
                out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {self.where()}, {stalled:.0f} s\n")
                out.flush()
                faulthandler.dump_traceback(file=out, all_threads=True)
            print(f"[vlpretrain] watchdog: rank {self.rank} has made no progress for {stalled:.0f} s in "
                  f"{self.where()}; its stacks: {self.stacks}", file=sys.stderr, flush=True)
