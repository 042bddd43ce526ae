"""`python -m pretrain.train`: ALBEF pretraining (ITC + ITM + MLM) on a DeepSpeed ZeRO-3 engine.

Launch with `deepspeed [launcher flags] launch/pretrain.sh [flags]` or `bash launch/pretrain.sh [flags]`.
User mistakes are caught before any process group exists, in `pretrain.preflight`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from dataclasses import asdict
from datetime import timedelta
from functools import partial
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from data_pipeline import DataError, load_eval_data, make_train_loader
from pretrain.batch import to_device
from pretrain.checkpoint import load_checkpoint, newest_checkpoint, rng_state, save_checkpoint, set_rng_state
from pretrain.ds_config import zero_stage
from pretrain.export import export_run, initialise_partitioned, load_pretrained_partitioned
from pretrain.faults import NonFiniteSteps, RunHalted, is_collective_failure, lost_contact
from pretrain.flops import train_flops_per_sample
from pretrain.metrics import ThroughputWindow, TrainLog, console_line
from pretrain.model import ALBEF
from pretrain.optim import build_optimizer, build_scheduler
from pretrain.preemption import StopSignals
from pretrain.preflight import Setup, prepare
from pretrain.recipe import DistSection, RecipeError, add_recipe_arguments, recipe_to_dict
from pretrain.retrieval import evaluate_retrieval, format_table, save_eval_json
from pretrain.watchdog import Watchdog

STEP_OUTPUTS = ("loss", "loss_itc", "loss_itm", "loss_mlm", "itm_accuracy", "itc_positive_sim", "itc_negative_sim")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.train",
        description="ALBEF-style vision-language pretraining on DeepSpeed. Options after --recipe override it.")
    parser.add_argument("--recipe", default=None,
                        help="YAML recipe: a path or a name in pretrain/recipes/ (e.g. tiny_synthetic)")
    parser.add_argument("--resume", default="none",
                        help="'auto': continue from the newest complete checkpoint of this run, if any; 'none'")
    parser.add_argument("--validate-only", action="store_true",
                        help="check recipe, data, tokenizer and DeepSpeed config, then exit")
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                        help=argparse.SUPPRESS)  # passed by the DeepSpeed launcher
    add_recipe_arguments(parser)
    args = parser.parse_args(argv)
    if args.resume not in ("none", "auto"):
        parser.error(f"--resume must be 'auto' or 'none', got {args.resume!r}")
    return args


def batches_forever(loader):
    """Epoch after epoch; the loader keeps its own epoch and position, so a resume continues mid-epoch."""
    while True:
        yield from loader
        loader.set_epoch(loader.epoch + 1)


def train_step(engine, micro_batches: list[dict], watchdog: Watchdog) -> dict[str, torch.Tensor]:
    """One optimizer step: forward + backward per micro-batch; DeepSpeed updates after the last one
    (or skips the update when the gradient norm is not finite: see NonFiniteSteps).

    Returns the step's means as detached device tensors, read (synchronising) on log steps only.
    """
    totals: dict[str, torch.Tensor] = {}
    for batch in micro_batches:
        watchdog.enter("forward")
        out = engine(batch)
        watchdog.enter("backward")
        engine.backward(out.loss)
        watchdog.enter("optimizer step")
        engine.step()
        for name in STEP_OUTPUTS:
            totals[name] = totals.get(name, 0) + getattr(out, name).detach().float() / len(micro_batches)
    totals["temperature"] = out.temperature.float()
    return totals


def step_scalars(values: dict[str, float], lr: float, grad_norm) -> dict[str, float]:
    return {
        "loss/total": values["loss"], "loss/itc": values["loss_itc"], "loss/itm": values["loss_itm"],
        "loss/mlm": values["loss_mlm"], "train/itm_accuracy": values["itm_accuracy"],
        "train/itc_positive_sim": values["itc_positive_sim"], "train/itc_negative_sim": values["itc_negative_sim"],
        "train/temperature": values["temperature"], "train/lr": lr, "train/grad_norm": float(grad_norm or 0.0),
    }  # fmt: skip


def mean_over_ranks(values: dict, device: torch.device) -> dict[str, float]:
    """Mean of each value over ranks, on the engine's device (NCCL reduces device tensors only)."""
    keys = sorted(values)
    tensor = torch.stack([torch.as_tensor(values[k], dtype=torch.float64, device=device).reshape(()) for k in keys])
    dist.all_reduce(tensor)
    return dict(zip(keys, (tensor / dist.get_world_size()).tolist()))


def skipped_over_ranks(loader) -> dict[str, float]:
    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, loader.skip_counts())
    total: dict[str, float] = defaultdict(float)
    for rank_counts in counts:
        for reason, n in rank_counts.items():
            total[f"data/skipped_{reason}"] += n
            total["data/skipped_total"] += n
    total.setdefault("data/skipped_total", 0.0)
    return dict(total)


def run_evaluation(engine, eval_data, setup: Setup, step: int, log: TrainLog, dtype: torch.dtype) -> dict:
    recipe = setup.recipe
    metrics, block = evaluate_retrieval(engine.module, eval_data, recipe.eval.batch_size, recipe.eval.itm_rerank_k,
                                        engine.device, dtype)
    if dist.get_rank() == 0:
        save_eval_json(recipe.run_path / "eval.json", metrics)
        log.retrieval(step, metrics, block)
        tqdm.write(f"[step {step}] " + format_table(metrics))
    return metrics


def share_cpu_cores() -> None:
    """On CPU, give each local rank its share of the cores: torch's default (all cores per process)
    oversubscribes them when several ranks share a machine. OMP_NUM_THREADS, if set, wins."""
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))


def build_engine(setup: Setup):
    """The model built inside zero.Init (so it never has to fit on one device), initialised and loaded
    with pretrained weights in place, wrapped with its optimizer and schedule in a DeepSpeed engine."""
    recipe, stage = setup.recipe, zero_stage(setup.ds_config)
    with deepspeed.zero.Init(config_dict_or_path=setup.ds_config, enabled=stage == 3):
        model = ALBEF(setup.model_config)
    if stage == 3:
        initialise_partitioned(model)
    load_pretrained_partitioned(model, vit=recipe.model.vit, bert=recipe.model.bert)
    offload = setup.ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu"
    optimizer = build_optimizer(model, recipe.optim, offload_to_cpu=offload)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=setup.ds_config,
                                           lr_scheduler=build_scheduler(optimizer, recipe.schedule, recipe.optim))
    apply_collective_timeout(recipe.dist.timeout)
    held = sum(getattr(p, "ds_tensor", p).numel() for p in model.parameters())
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    print(f"[vlpretrain] rank {dist.get_rank()} holds {held} of {total} parameter elements", flush=True)
    return engine


def apply_collective_timeout(timeout: timedelta) -> None:
    """Give every process group the recipe's timeout. DeepSpeed makes groups of its own without one (a
    clone of the world group, for one), and those get torch's default: 30 min on gloo."""
    for group in list(dist.distributed_c10d._world.pg_map):
        if not dist.distributed_c10d._rank_not_in_group(group):
            dist.distributed_c10d._set_pg_timeout(timeout, group)


def build_data(setup: Setup, rank: int, world: int):
    recipe, image_size = setup.recipe, setup.model_config.image_size
    loader = make_train_loader(
        recipe.data.train, setup.tokenizer, batch_size=recipe.schedule.micro_batch_size, rank=rank,
        world_size=world, num_workers=recipe.data.num_workers, seed=recipe.seed, image_size=image_size,
        max_len=recipe.data.max_len, mode=recipe.data.mode, mlm_probability=recipe.data.mlm_probability,
        crop_scale=recipe.data.crop_scale, hflip=recipe.data.hflip, max_bad_fraction=recipe.data.max_bad_fraction)
    eval_data = None
    if recipe.data.val:
        eval_data = load_eval_data(recipe.data.val, setup.tokenizer, image_size=image_size,
                                   max_len=recipe.data.max_len)
    return loader, eval_data


def write_run_files(setup: Setup) -> None:
    run_path = setup.recipe.run_path
    run_path.mkdir(parents=True, exist_ok=True)
    (run_path / "recipe.yaml").write_text(yaml.safe_dump(recipe_to_dict(setup.recipe), sort_keys=False))
    (run_path / "model_config.json").write_text(json.dumps(asdict(setup.model_config), indent=2))


def train(setup: Setup, resume: str) -> dict:
    recipe = setup.recipe
    stop_signals = StopSignals()
    stop_signals.install()  # from the start: a signal during start-up stops the job after its first step
    share_cpu_cores()
    start_distributed(recipe.dist)
    rank, ckpt_dir = dist.get_rank(), recipe.run_path / "checkpoints"
    with Watchdog(rank, recipe.dist.watchdog_minutes * 60, recipe.run_path / "watchdog") as watchdog:
        try:
            return run(setup, resume, stop_signals, watchdog)
        except RuntimeError as err:
            if not is_collective_failure(err):
                raise
            raise lost_contact(err, rank, watchdog.where(), newest_checkpoint(ckpt_dir)) from None


def start_distributed(section: DistSection) -> None:
    deepspeed.init_distributed(dist_backend=section.backend, timeout=section.timeout)
    release_shared_memory_names()


def release_shared_memory_names() -> None:
    """DeepSpeed's CPU all-reduce (all ranks on one machine) maps one ~70 MB /dev/shm buffer per rank and
    never unlinks it: every CPU job left that RAM behind until reboot. Once every rank has mapped every
    buffer (init_distributed has returned everywhere: the barrier), the names can go; the mappings last
    as long as the processes, and so end with them, kill -9 included. Only the CPU accelerator has them."""
    if torch.cuda.is_available():
        return
    dist.barrier()
    parts = ("deepspeed_allreduce_buffer", os.getuid(), os.environ.get("MASTER_ADDR", ""),
             os.environ.get("MASTER_PORT", ""), dist.get_rank())
    Path("/dev/shm", "_".join(map(str, parts))).unlink(missing_ok=True)


def restore(engine, loader, ckpt_dir: Path) -> int:
    """Weights, optimizer, schedule, this rank's data position and RNG from the newest complete checkpoint;
    the step to continue from (0 without one)."""
    state = load_checkpoint(engine, ckpt_dir)
    if not state:
        return 0
    loader.load_state_dict(state["rank_state"]["loader"])
    set_rng_state(state["rank_state"]["rng"])
    return state["step"]


def run(setup: Setup, resume: str, stop_signals: StopSignals, watchdog: Watchdog) -> dict:
    recipe, schedule = setup.recipe, setup.recipe.schedule
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(recipe.seed)
    run_path, ckpt_dir = recipe.run_path, recipe.run_path / "checkpoints"
    if rank == 0:
        write_run_files(setup)
    engine = build_engine(setup)
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    loader, eval_data = build_data(setup, rank, world)
    step = start_step = restore(engine, loader, ckpt_dir) if resume == "auto" else 0

    log = TrainLog(run_path, enabled=rank == 0, resume_step=start_step)
    log.text("config/recipe", "```\n" + yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False) + "\n```", step)
    if rank == 0:
        print(f"[vlpretrain] world_size={world} zero_stage={zero_stage(setup.ds_config)} "
              f"bf16={'on' if engine.bfloat16_enabled() else 'off'} dtype={dtype} "
              f"attention={setup.model_config.attention} resume_step={step} run={run_path}", flush=True)
    flops_per_sample = partial(train_flops_per_sample, setup.model_config,
                               mlm_probability=recipe.data.mlm_probability)
    window = ThroughputWindow(flops_per_sample, schedule.micro_batch_size * schedule.grad_accum * world, world,
                              recipe.logging.peak_tflops)
    nonfinite = NonFiniteSteps(recipe.optim.max_nonfinite_steps, partial(newest_checkpoint, ckpt_dir), rank == 0)
    stream = batches_forever(loader)
    progress = tqdm(total=schedule.max_steps, initial=step, disable=rank != 0, desc="train", dynamic_ncols=True)

    def checkpoint() -> None:
        watchdog.enter("checkpoint")
        save_checkpoint(engine, ckpt_dir, step, {"loader": loader.state_dict(), "rng": rng_state()},
                        keep=recipe.checkpoint.keep)

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
            run_evaluation(engine, eval_data, setup, step, log, dtype)
    progress.close()

    if step > start_step:  # a resumed, already finished run must not rewrite its only checkpoint
        checkpoint()
    if step < schedule.max_steps:
        if rank == 0:
            reason = f"on {stop_signal}" if stop_signal else "as asked (schedule.exit_at_step)"
            print(f"[vlpretrain] exiting at step {step} {reason} with a checkpoint; continue with --resume auto",
                  flush=True)
        log.close()
        return {}
    watchdog.enter("evaluation")
    metrics = run_evaluation(engine, eval_data, setup, step, log, dtype) if eval_data else {}
    watchdog.enter("export")
    finish(setup, step, log)
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


def finish(setup: Setup, step: int, log: TrainLog) -> None:
    """Export the finished run (rank 0, from the final checkpoint) and say where everything is."""
    recipe = setup.recipe
    dist.barrier()
    if dist.get_rank() == 0:
        export_run(recipe.run_path / "checkpoints", setup.model_config, setup.tokenizer, recipe.run_path / "export")
        print(f"[vlpretrain] done at step {step}; exported to {recipe.run_path / 'export'}\n"
              f"[vlpretrain] view the logs with: tensorboard --logdir {recipe.logging.run_dir}", flush=True)
    log.close()
    dist.barrier()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        setup = prepare(args)
    except (RecipeError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.validate_only:
        print(f"[vlpretrain] recipe, data, tokenizer and DeepSpeed config are valid for world_size={setup.world_size}")
        return 0
    try:
        train(setup, args.resume)
    except (RecipeError, DataError) as err:  # e.g. a checkpoint's loader state that the recipe contradicts
        tqdm.write(f"error: {err}", file=sys.stderr)
        return 2
    except RunHalted as err:
        if not err.agreed or dist.get_rank() == 0:
            tqdm.write(f"error: {err}", file=sys.stderr)  # on a line of its own, not after the progress bar
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
