"""The training loop: steps, logging, checkpoints, evaluation and export, with the fault handling around
them. Every rank runs it; rank 0 alone writes logs and the export."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from pretrain.batch import to_device
from pretrain.train.checkpoint import (
    load_checkpoint,
    needs_universal_load,
    newest_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from pretrain.train.ds_config import with_universal_load, zero_stage
from pretrain.train.engine import build_engine, rank_seed, share_cpu_cores, start_distributed
from pretrain.train.metrics import (
    ThroughputWindow,
    TrainLog,
    console_line,
    mean_over_ranks,
    skipped_over_ranks,
    step_scalars,
)
from pretrain.train.preflight import Setup
from pretrain.train.reliability.faults import NonFiniteSteps, is_collective_failure, lost_contact
from pretrain.train.reliability.preemption import StopSignals, note_exit
from pretrain.train.reliability.watchdog import Watchdog


def batches_forever(loader):
    """Epoch after epoch; the loader keeps its own epoch and position, so a resume continues mid-epoch."""
    while True:
        yield from loader
        loader.set_epoch(loader.epoch + 1)


def train_step(engine, micro_batches: list[dict], watchdog: Watchdog) -> dict[str, torch.Tensor]:
    """One optimizer step: forward + backward per micro-batch; DeepSpeed updates after the last one
    (or skips the update when the gradient norm is not finite: see NonFiniteSteps).

    Returns the step's means of the model's outputs (every field of its NamedTuple) as detached device
    tensors, read (synchronising) on log steps only.
    """
    totals: dict[str, torch.Tensor] = {}
    for batch in micro_batches:
        watchdog.enter("forward")
        out = engine(batch)
        watchdog.enter("backward")
        engine.backward(out.loss)
        watchdog.enter("optimizer step")
        engine.step()
        for name, value in out._asdict().items():
            totals[name] = totals.get(name, 0) + value.detach().float() / len(micro_batches)
    return totals


def write_run_files(setup: Setup) -> None:
    run_path = setup.recipe.run_path
    run_path.mkdir(parents=True, exist_ok=True)
    (run_path / "recipe.yaml").write_text(yaml.safe_dump(asdict(setup.recipe), sort_keys=False))
    if setup.model_config is not None:  # a task without our model (the caption LM) has none
        (run_path / "model_config.json").write_text(json.dumps(asdict(setup.model_config), indent=2))
    setup.tokenizer.save_pretrained(str(run_path / "tokenizer"))  # data.tokenizer's folder may be remade later


def train(setup: Setup, resume: str) -> dict:
    recipe = setup.recipe
    stop_signals = StopSignals()
    stop_signals.install()  # from the start: a signal during start-up stops the job after its first step
    share_cpu_cores()
    start_distributed(recipe.dist)
    rank, ckpt_dir = dist.get_rank(), recipe.run_path / "checkpoints"
    try:
        with Watchdog(rank, recipe.dist.watchdog_minutes * 60, recipe.run_path / "watchdog") as watchdog:
            try:
                return run(setup, resume, stop_signals, watchdog)
            except RuntimeError as err:
                if not is_collective_failure(err):
                    raise
                raise lost_contact(err, rank, watchdog.where(), newest_checkpoint(ckpt_dir)) from None
    finally:
        # gloo's worker threads must stop while the interpreter is alive: left to its teardown, they can abort
        # the rank ("terminate called without an active exception", exit 250) after it reported its outcome
        dist.destroy_process_group()


def restore(engine, loader, ckpt_dir: Path, seed: int, without_frozen: bool = False) -> int:
    """Weights, optimizer, schedule, this rank's data position and RNG from the newest complete checkpoint;
    the step to continue from (0 without one).

    Saved by another number of ranks: the data continues from the same global sample position, and the
    ranks' random draws start anew from (seed, rank, step)."""
    state = load_checkpoint(engine, ckpt_dir, without_frozen)
    if not state:
        return 0
    rank, saved = dist.get_rank(), state["rank_states"]
    if len(saved) == dist.get_world_size():
        loader.load_state_dict(saved[rank]["loader"])
        set_rng_state(saved[rank]["rng"])
        return state["step"]
    loader.load_state_dict_from_ranks([s["loader"] for s in saved])
    # a universal checkpoint carries no frozen weights or buffers: a momentum teacher starts again from the
    # loaded weights, with an empty queue and alpha's ramp from 0
    engine.module.start_momentum_teacher()
    torch.manual_seed(rank_seed(seed, rank, state["step"]))
    if rank == 0:
        position = loader.state_dict()
        print(f"[vlpretrain] resuming step {state['step']}, saved by {len(saved)} ranks, on {dist.get_world_size()}: "
              f"weights and optimizer from its universal checkpoint; data at epoch {position['epoch']}, sample "
              f"{position['samples_consumed'] * dist.get_world_size()} of the epoch (saved: "
              f"{sum(s['loader']['samples_consumed'] for s in saved)})", flush=True)
    return state["step"]


def run(setup: Setup, resume: str, stop_signals: StopSignals, watchdog: Watchdog) -> dict:
    recipe, schedule = setup.recipe, setup.recipe.schedule
    rank, world = dist.get_rank(), dist.get_world_size()
    run_path, ckpt_dir = recipe.run_path, recipe.run_path / "checkpoints"
    if rank == 0:
        write_run_files(setup)
    if resume == "auto" and needs_universal_load(ckpt_dir, world):
        setup = replace(setup, ds_config=with_universal_load(setup.ds_config))
    engine = build_engine(setup)
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    loader, eval_data = setup.task.build_data(setup, rank, world)
    step = start_step = 0
    if resume == "auto":
        step = start_step = restore(engine, loader, ckpt_dir, recipe.seed, setup.task.frozen_is_base)

    log = TrainLog(run_path, enabled=rank == 0, resume_step=start_step)
    log.text("config/recipe", "```\n" + yaml.safe_dump(asdict(recipe), sort_keys=False) + "\n```", step)
    if rank == 0:
        print(f"[vlpretrain] world_size={world} zero_stage={zero_stage(setup.ds_config)} "
              f"bf16={'on' if engine.bfloat16_enabled() else 'off'} dtype={dtype} "
              f"attention={getattr(setup.model_config, 'attention', 'transformers')} resume_step={step} "
              f"run={run_path}", flush=True)
    samples_per_step = schedule.micro_batch_size * schedule.grad_accum * world
    window = ThroughputWindow(setup.task.flops_per_sample(setup), samples_per_step, world, recipe.logging.peak_tflops)
    nonfinite = NonFiniteSteps(recipe.optim.max_nonfinite_steps, partial(newest_checkpoint, ckpt_dir), rank == 0)
    stream = batches_forever(loader)
    progress = tqdm(total=schedule.max_steps, initial=step, disable=rank != 0, desc="train", dynamic_ncols=True)

    def checkpoint() -> None:
        watchdog.enter("checkpoint")
        save_checkpoint(engine, ckpt_dir, step, {"loader": loader.state_dict(), "rng": rng_state()},
                        keep=recipe.checkpoint.keep, without_frozen=setup.task.frozen_is_base)

    stop_signal = None
    last_step = min(schedule.max_steps, schedule.exit_at_step or schedule.max_steps)
    while step < last_step and not stop_signal:
        watchdog.enter("data", step + 1)
        fetch_start = time.perf_counter()
        micro_batches = [to_device(next(stream), engine.device, dtype) for _ in range(schedule.grad_accum)]
        window.add_step(data_wait=time.perf_counter() - fetch_start,
                        tokens=sum(b["attention_mask"].sum() for b in micro_batches))
        lr = engine.get_lr()[0]  # the rate this step applies; the scheduler advances inside engine.step()
        values = train_step(engine, micro_batches, watchdog)
        step += 1
        progress.update(1)
        watchdog.enter("logging")
        if step % recipe.logging.every == 0 or step == schedule.max_steps:
            log_step(engine, loader, log, window, values, lr, step, progress)
        nonfinite.update(engine.was_step_applied(), step)
        stop_signal = stop_signals.agreed(engine.device)  # then the checkpoint after the loop is the last one
        if stop_signal:
            break
        if recipe.checkpoint.every and step % recipe.checkpoint.every == 0 and step < last_step:
            checkpoint()
        if eval_data and recipe.eval.every and step % recipe.eval.every == 0 and step < schedule.max_steps:
            watchdog.enter("evaluation")
            setup.task.evaluate(engine, eval_data, setup, step, log, dtype)
    progress.close()

    if step > start_step:  # a resumed, already finished run must not rewrite its only checkpoint
        checkpoint()
    if step < schedule.max_steps:
        if rank == 0:
            reason = f"on {stop_signal}" if stop_signal else "as asked (schedule.exit_at_step)"
            ended = f"exiting at step {step} {reason} with a checkpoint; continue with --resume auto"
            print(f"[vlpretrain] {ended}", flush=True)
            note_exit(ended)
        log.close()
        return {}
    watchdog.enter("evaluation")
    metrics = setup.task.evaluate(engine, eval_data, setup, step, log, dtype) if eval_data else {}
    watchdog.enter("export")
    finish(engine, setup, step, log)
    return metrics


def log_step(engine, loader, log: TrainLog, window: ThroughputWindow, values: dict, lr: float, step: int,
             progress: tqdm) -> None:
    """Rank means of the step's figures and the window's speed to TensorBoard, metrics.jsonl and the console."""
    values = mean_over_ranks({**values, "tokens": window.tokens}, engine.device)
    scalars = {**step_scalars(values, lr, engine.get_global_grad_norm()), **window.scalars(values["tokens"]),
               "train/skipped_steps": engine.skipped_steps, **skipped_over_ranks(loader)}
    log.scalars(step, scalars)
    if not progress.disable:  # rank 0
        progress.write(console_line(step, progress.total, scalars))
    window.reset()


def finish(engine, setup: Setup, step: int, log: TrainLog) -> None:
    """Export the finished run (the task's export, after the final checkpoint) and say where everything is."""
    recipe = setup.recipe
    dist.barrier()
    exported = setup.task.export(engine, setup)
    if dist.get_rank() == 0:
        note_exit(f"done at step {step}; exported to {exported}")
        print(f"[vlpretrain] done at step {step}; exported to {exported}\n"
              f"[vlpretrain] view the logs with: tensorboard --logdir {recipe.logging.run_dir}", flush=True)
    log.close()
    dist.barrier()


