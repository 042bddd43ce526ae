"""Faults that end a run with one clear line: too many non-finite steps, a lost rank, a failed checkpoint.

Each becomes a `RunHalted` whose message names the step, the cause, the newest complete checkpoint and
how to continue; `pretrain.train.cli.main` prints it as one `error:` line and exits with status 1.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch.distributed as dist
from tqdm import tqdm

# gloo reports a dead or silent peer as a plain RuntimeError with one of these; NCCL errors that reach
# Python are torch.distributed.DistError (its timeouts abort the process from NCCL's own watchdog)
GLOO_PEER_FAILURES = ("Connection closed by peer", "Connection reset by peer", "Timed out waiting",
                      "Application timeout caused pair closure")


class RunHalted(Exception):
    """The run stopped itself; the message says why, where, and how to continue.

    `agreed`: every rank raises it at the same step, so one rank's line says it all.
    """

    def __init__(self, message: str, agreed: bool = False):
        super().__init__(message)
        self.agreed = agreed


class NonFiniteSteps:
    """Ends the run after `limit` optimizer steps in a row were skipped for a non-finite loss or gradient.

    DeepSpeed itself drops such a step whole, on every rank alike (the gradient norm it checks is global):
    no weight update, no optimizer-state update, no learning-rate step. The batch is not retried.
    """

    def __init__(self, limit: int, newest_checkpoint: Callable[[], str], announce: bool):
        self.limit, self.newest_checkpoint, self.announce = limit, newest_checkpoint, announce
        self.streak = 0

    def update(self, applied: bool, step: int) -> None:
        if applied:
            self.streak = 0
            return
        self.streak += 1
        if self.announce:
            tqdm.write(f"[vlpretrain] step {step}: non-finite loss or gradient; update skipped "
                       f"({self.streak} in a row, limit {self.limit or 'none'})")
        if self.limit and self.streak >= self.limit:
            raise RunHalted(
                f"steps {step - self.streak + 1}-{step} all had a non-finite loss or gradient and were skipped, "
                f"so the run stopped at step {step} (optim.max_nonfinite_steps {self.limit}); newest complete "
                f"checkpoint: {self.newest_checkpoint()}. Lower optim.lr or check the data, then "
                "continue with --resume auto", agreed=True)


def is_collective_failure(error: BaseException) -> bool:
    return isinstance(error, dist.DistError) or any(m in str(error) for m in GLOO_PEER_FAILURES)


def lost_contact(error: BaseException, rank: int, where: str, newest_checkpoint: str) -> RunHalted:
    # "[.../gloo/transport/tcp/pair.cc:553] Connection closed by peer [addr]. This is typically ...": keep
    # the first sentence without the source location
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip().split("\n")[0]).split(". ")[0] or type(error).__name__
    return RunHalted(
        f"rank {rank} lost contact with the other ranks in {where} ({text[:200]}): another rank died, "
        f"was killed or stopped responding (see its error or watchdog report). Newest complete checkpoint: "
        f"{newest_checkpoint}; restart the job with --resume auto")
