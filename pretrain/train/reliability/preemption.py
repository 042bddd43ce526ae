"""Preemption: SIGTERM or SIGUSR1 (what SLURM sends before a job's time limit, or on preemption) asks the
job to finish its step, write a checkpoint and exit cleanly.

A handler only records the signal; the training loop asks every rank at each step boundary, so all ranks
stop after the same step even when the signal reaches them at different moments, or reaches only one.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_NOTE = "VLPRETRAIN_EXIT_NOTE"


def note_exit(line: str) -> None:
    """Rank 0 tells a scheduler script how the run ended, in the file $VLPRETRAIN_EXIT_NOTE names (if set):
    DeepSpeed's launcher exits 1 on SIGTERM even when its ranks stopped cleanly with a checkpoint."""
    if os.environ.get(EXIT_NOTE):
        Path(os.environ[EXIT_NOTE]).write_text(line + "\n")


class StopSignals:
    def __init__(self):
        self.received = 0

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._record)

    def _record(self, signum: int, frame) -> None:
        self.received = signum

    def agreed(self, device: torch.device) -> str | None:
        """The name of a stop signal any rank received, or None. Every rank calls this at the same step."""
        flag = torch.tensor([self.received], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        received = int(flag.item())
        return signal.Signals(received).name if received else None
