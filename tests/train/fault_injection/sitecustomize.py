"""Fault injection for tests/train/test_faults.py.

Python imports `sitecustomize` at start-up from PYTHONPATH, so a job launched with this directory on its
PYTHONPATH runs its real launcher, engine, loader and checkpoint code with one fault planted in its
training ranks (launcher processes are left alone):

    VLPRETRAIN_FAULT="<kind>@<rank>:<step>[,<step>...]"   e.g. "kill@1:6", "nan@1:2,5,6,7"
      kill       SIGKILL the rank in the middle of the step's forward pass
      kill_save  SIGKILL the rank right after it wrote its first file of the step's checkpoint
      disk_full  the rank's first file of the step's checkpoint goes to /dev/full (a real ENOSPC from torch)
      no_write   from the step's checkpoint on, the rank can write no file (RLIMIT_FSIZE 0: a real EFBIG from
                 the kernel; a read-only directory would not do, as root ignores permissions)
      nan        the rank's batch of the step has NaN pixels (a non-finite loss and gradient)
      hang       the rank stops as the step's optimizer step begins and never comes back
      usr1       the rank sends SIGUSR1 to the job's whole process group during the step (as SLURM does)
      term       the rank sends SIGTERM to the job's whole process group during the step (as a scheduler
                 does on preemption; DeepSpeed's launcher passes it on to the ranks and waits for them)
      term_self  the rank sends SIGTERM to itself only during the step (the other ranks must stop with it)
      exit_init  the rank exits as soon as it has joined the process group (a failed start; give step 0)
      exit_ds_init  the rank fails 5 s into DeepSpeed's init_distributed, past the group's barrier, while the
                 others have mapped their /dev/shm buffers there and wait for its own (give step 0)
    VLPRETRAIN_PROBE=<dir>   each rank appends a JSON line per step to <dir>/rank<r>.jsonl: the step,
                             whether DeepSpeed applied it, and a digest of the rank's parameter
                             partition before and after it
    VLPRETRAIN_SHM_PROBE=<dir>  each rank writes <dir>/rank<r>.json as it releases DeepSpeed's /dev/shm
                             all-reduce buffer: the buffer's name (pretrain.compat's) and whether it existed
    VLPRETRAIN_LOADED=<file>  after a resume, rank 0 saves every parameter's full fp32 weight and Adam moments
                             as loaded ({name: {"fp32", "exp_avg", "exp_avg_sq"}}, torch.save)
"""

import json
import os

PROBES = ("VLPRETRAIN_FAULT", "VLPRETRAIN_PROBE", "VLPRETRAIN_SHM_PROBE", "VLPRETRAIN_LOADED")
if "LOCAL_RANK" in os.environ and any(name in os.environ for name in PROBES):
    import hashlib
    import resource
    import signal
    import time
    from pathlib import Path

    import torch

    import pretrain.compat as compat
    import pretrain.train.loop as train_module

    RANK = int(os.environ["RANK"])
    KIND, _, WHERE = os.environ.get("VLPRETRAIN_FAULT", "none@-1:0").partition("@")
    FAULT_RANK, _, STEPS = WHERE.partition(":")
    FAULT_STEPS = {int(s) for s in STEPS.split(",")}
    HERE = int(FAULT_RANK) == RANK  # this rank carries the fault
    PROBE = os.environ.get("VLPRETRAIN_PROBE")
    SHM_PROBE = os.environ.get("VLPRETRAIN_SHM_PROBE")
    real_train_step, real_save = train_module.train_step, torch.save
    real_save_checkpoint, real_release = train_module.save_checkpoint, compat.release_deepspeed_shm_buffers
    real_init_process_group = torch.distributed.init_process_group
    real_restore = train_module.restore

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
                os.killpg(os.getpgrp(), signal.SIGTERM)
            elif KIND == "term_self":
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

    def faulty_save_checkpoint(engine, ckpt_dir, step, *args, **kwargs):
        if HERE and KIND == "no_write" and step in FAULT_STEPS:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
            resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        return real_save_checkpoint(engine, ckpt_dir, step, *args, **kwargs)

    def recording_release() -> None:
        buffer = compat.deepspeed_shm_buffer(RANK)
        existed = buffer.exists()
        real_release()
        if SHM_PROBE:
            (Path(SHM_PROBE) / f"rank{RANK}.json").write_text(json.dumps({"buffer": str(buffer), "existed": existed}))

    def recording_restore(engine, *args, **kwargs):
        step = real_restore(engine, *args, **kwargs)
        if step and os.environ.get("VLPRETRAIN_LOADED"):
            from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

            loaded = {name: {"fp32": safe_get_full_fp32_param(param),
                             **{key: safe_get_full_optimizer_state(param, key) for key in ("exp_avg", "exp_avg_sq")}}
                      for name, param in engine.module.named_parameters()}  # collectives: every rank calls them
            if RANK == 0:
                torch.save(loaded, os.environ["VLPRETRAIN_LOADED"])
        return step

    def faulty_init_process_group(*args, **kwargs):
        real_init_process_group(*args, **kwargs)
        if HERE and KIND == "exit_init":
            os._exit(1)

    def faulty_ds_init(*args, **kwargs):
        time.sleep(5)
        raise RuntimeError("injected: this rank failed inside deepspeed.init_distributed")

    if HERE and KIND == "exit_ds_init":
        import deepspeed

        deepspeed.init_distributed = faulty_ds_init
    train_module.train_step = faulty_train_step
    train_module.restore = recording_restore
    train_module.save_checkpoint = faulty_save_checkpoint
    compat.release_deepspeed_shm_buffers = recording_release
    torch.save = faulty_save
    torch.distributed.init_process_group = faulty_init_process_group
