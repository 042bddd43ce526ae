"""Fault injection for tests/train/test_faults.py.

Python imports `sitecustomize` at start-up from PYTHONPATH, so a job launched with this directory on its
PYTHONPATH runs its real launcher, engine, loader and checkpoint code with one fault planted in its
training ranks (launcher processes are left alone):

    VLPRETRAIN_FAULT="<kind>@<rank>:<step>[,<step>...]"   e.g. "kill@1:6", "nan@1:2,5,6,7"
      kill       SIGKILL the rank in the middle of the step's forward pass
      kill_save  SIGKILL the rank right after it wrote its first file of the step's checkpoint
      disk_full  the rank's first file of the step's checkpoint goes to /dev/full (a real ENOSPC from torch)
      nan        the rank's batch of the step has NaN pixels (a non-finite loss and gradient)
      hang       the rank stops as the step's optimizer step begins and never comes back
      usr1       the rank sends SIGUSR1 to the job's whole process group during the step (as SLURM does)
      term       the rank sends SIGTERM to itself only during the step (the other ranks must follow)
    VLPRETRAIN_PROBE=<dir>   each rank appends a JSON line per step to <dir>/rank<r>.jsonl: the step,
                             whether DeepSpeed applied it, and a digest of the rank's parameter
                             partition before and after it
"""

import json
import os

if "LOCAL_RANK" in os.environ and ("VLPRETRAIN_FAULT" in os.environ or "VLPRETRAIN_PROBE" in os.environ):
    import hashlib
    import signal
    import time
    from pathlib import Path

    import torch

    import pretrain.train.loop as train_module

    RANK = int(os.environ["RANK"])
    KIND, _, WHERE = os.environ.get("VLPRETRAIN_FAULT", "none@-1:0").partition("@")
    FAULT_RANK, _, STEPS = WHERE.partition(":")
    FAULT_STEPS = {int(s) for s in STEPS.split(",")}
    HERE = int(FAULT_RANK) == RANK  # this rank carries the fault
    PROBE = os.environ.get("VLPRETRAIN_PROBE")
    real_train_step, real_save = train_module.train_step, torch.save

    def partition_digest(engine) -> str:
        """A digest of this rank's parameter partition: it changes whenever one element does (a sum can
        miss small updates next to the uninitialised padding ZeRO leaves at a partition's end)."""
        tensors = [getattr(p, "ds_tensor", p).detach().flatten() for p in engine.module.parameters()]
        return hashlib.sha256(torch.cat(tensors).numpy().tobytes()).hexdigest()

    def in_forward(engine, action) -> None:
        """Run `action` once, inside the forward pass: after the encoders, as the fusion encoder starts."""

        def hook(module, args):
            handle.remove()
            action()

        handle = engine.module.fusion_encoder.register_forward_pre_hook(hook)

    def faulty_train_step(engine, micro_batches, watchdog):
        step = engine.global_steps + 1  # DeepSpeed's counter is restored on resume, like ours
        if HERE and step in FAULT_STEPS:
            if KIND == "kill":
                in_forward(engine, lambda: os.kill(os.getpid(), signal.SIGKILL))
            elif KIND == "hang":
                engine.step = lambda *args, **kwargs: time.sleep(3600)  # an instance attribute: this step only
            elif KIND == "nan":
                for batch in micro_batches:
                    batch["pixel_values"].fill_(float("nan"))
            elif KIND == "usr1":
                os.killpg(os.getpgrp(), signal.SIGUSR1)
            elif KIND == "term":
                os.kill(os.getpid(), signal.SIGTERM)
        before = partition_digest(engine) if PROBE else ""
        values = real_train_step(engine, micro_batches, watchdog)
        if PROBE:
            after = partition_digest(engine)
            row = {"step": step, "applied": engine.was_step_applied(), "before": before, "after": after}
            with open(Path(PROBE) / f"rank{RANK}.jsonl", "a") as out:
                out.write(json.dumps(row) + "\n")
        return values

    def faulty_save(obj, path, *args, **kwargs):
        tag = f"step{min(FAULT_STEPS):08d}"
        real_save(obj, "/dev/full" if HERE and KIND == "disk_full" and tag in str(path) else path, *args, **kwargs)
        if HERE and KIND == "kill_save" and tag in str(path):
            os.kill(os.getpid(), signal.SIGKILL)

    train_module.train_step = faulty_train_step
    torch.save = faulty_save
