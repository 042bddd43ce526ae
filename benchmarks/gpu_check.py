"""One GPU check for the day a GPU is lent: prints one JSON object.

- `flash_attn_tests`: the CUDA-marked model tests (flash-attn against eager), as pytest counts them;
- `matmul_peak_tflops`: the measured bf16 matmul peak (MFU is against it, not a datasheet);
- `zero3_step`: bf16 ZeRO-3 training steps of the base preset at batch 64 on one rank, built by the training
  engine itself (`pretrain.train.engine.build_engine`): samples/s, MFU (the model's FLOP count), peak memory;
- `attention`: forward + backward of the same model and batch with each attention backend (flash_attn, sdpa,
  eager), samples/s, and each one's speed relative to eager.

    bash benchmarks/gpu_check.sh             # one GPU; under 8 minutes
    bash benchmarks/gpu_check.sh --dry-run   # CPU: tiny preset, batch 2, fp32, the same code as far as it goes

Random batches (pixels, 32-token captions of COCO-like lengths, 15% MLM masks), so no data is needed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from pretrain.batch import to_device
from pretrain.model import ALBEF, model_preset
from pretrain.model.attention import FLASH_ATTN_INSTALLED
from pretrain.train.ds_config import build_ds_config
from pretrain.train.flops import train_flops_per_sample
from pretrain.train.recipe import recipe_from_dict

REPO = Path(__file__).resolve().parents[1]
VOCAB = 30522  # BERT's
TEXT_LEN, MEAN_TOKENS, MLM_PROBABILITY = 32, 14.0, 0.15
GPU = {"preset": "base", "batch": 64, "dtype": torch.bfloat16, "ds_config": "zero3", "backend": "nccl",
       "matmul_n": 8192, "steps": 10, "warmup": 3}
DRY = {"preset": "tiny", "batch": 2, "dtype": torch.float32, "ds_config": "cpu_zero3", "backend": "gloo",
       "matmul_n": 512, "steps": 1, "warmup": 1}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="on CPU: tiny preset, batch 2, fp32")
    return parser.parse_args()


def flash_attn_tests() -> dict:
    """pytest's counts for the CUDA-marked model tests (they skip without CUDA and flash-attn)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                           "tests/model"], cwd=REPO, capture_output=True, text=True)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", summary)}
    return {"returncode": proc.returncode, **{k: counts.get(k, 0) for k in ("passed", "failed", "skipped")},
            "summary": summary}


def significant(x: float) -> float:
    return float(f"{x:.4g}")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(n: int, dtype: torch.dtype, device: torch.device, repeats: int = 10) -> float:
    """Best FLOP/s of an n x n matmul."""
    x, y = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    x @ y
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        x @ y
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def random_batch(batch: int, image_size: int) -> dict:
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, VOCAB, (batch, TEXT_LEN), generator=g)
    lengths = (MEAN_TOKENS + 3 * torch.randn(batch, generator=g)).round().clamp(10, TEXT_LEN)
    attention_mask = (torch.arange(TEXT_LEN)[None] < lengths[:, None]).long()
    masked = (torch.rand(batch, TEXT_LEN, generator=g) < MLM_PROBABILITY) & attention_mask.bool()
    return {"pixel_values": torch.randn(batch, 3, image_size, image_size, generator=g), "input_ids": input_ids,
            "attention_mask": attention_mask, "mlm_input_ids": torch.where(masked, 103, input_ids),
            "mlm_labels": torch.where(masked, input_ids, -100), "image_ids": torch.arange(batch)}


def timed_steps(step, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per step, after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # the process's peak RSS (KiB on Linux)


def zero3_step(c: dict, peak: float) -> dict:
    """Training steps of one rank's DeepSpeed ZeRO-3 engine, built as the training job builds it."""
    from pretrain.train.engine import build_engine, start_distributed
    from pretrain.train.task import PretrainTask

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)
    recipe = recipe_from_dict({"model": {"preset": c["preset"]},
                               "schedule": {"micro_batch_size": c["batch"], "grad_accum": 1, "warmup_steps": 1},
                               "dist": {"ds_config": c["ds_config"], "backend": c["backend"]}})
    config = model_preset(c["preset"], vocab_size=VOCAB)
    ds_config = build_ds_config(recipe.dist.ds_config, recipe.schedule, world_size=1)
    start_distributed(recipe.dist)
    engine = build_engine(SimpleNamespace(recipe=recipe, model_config=config, ds_config=ds_config,
                                          task=PretrainTask()))
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    batch = to_device(random_batch(c["batch"], config.image_size), engine.device, dtype)
    losses = []

    def step() -> None:
        out = engine(batch)
        engine.backward(out.loss)
        engine.step()
        losses.append(out.loss.detach())

    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = timed_steps(step, c["steps"], c["warmup"], engine.device)
    samples_per_s = c["batch"] / seconds
    flops = train_flops_per_sample(config, MEAN_TOKENS, MLM_PROBABILITY)
    return {"preset": c["preset"], "batch": c["batch"], "dtype": str(dtype), "zero_stage": 3,
            "steps_timed": c["steps"], "samples_per_s": significant(samples_per_s),
            "tflops_per_s": significant(flops * samples_per_s / 1e12), "mfu": significant(flops * samples_per_s / peak),
            "peak_memory_gb": round(peak_memory_gb(engine.device), 2),
            "losses_finite": bool(torch.isfinite(torch.stack(losses)).all())}


def attention_speeds(c: dict, device: torch.device) -> dict:
    """Forward + backward samples/s of the plain model per attention backend, and each relative to eager."""
    half = c["dtype"] != torch.float32
    batch = to_device(random_batch(c["batch"], model_preset(c["preset"]).image_size), device, torch.float32)
    speeds: dict[str, float | None] = {}
    notes = {}
    for backend in ("flash_attn", "sdpa", "eager"):
        if backend == "flash_attn" and not (FLASH_ATTN_INSTALLED and device.type == "cuda" and half):
            speeds[backend], notes[backend] = None, "needs CUDA, bf16 and the flash-attn package"
            continue
        torch.manual_seed(0)
        model = ALBEF(model_preset(c["preset"], vocab_size=VOCAB, attention=backend)).to(device).train()

        def step(model=model) -> None:
            with torch.autocast(device.type, dtype=c["dtype"], enabled=half):
                loss = model(batch).loss
            loss.backward()
            model.zero_grad(set_to_none=True)

        speeds[backend] = significant(c["batch"] / timed_steps(step, c["steps"], c["warmup"], device))
        del model
    eager = speeds["eager"]
    return {"samples_per_s": speeds, "relative_to_eager": {k: (round(v / eager, 3) if v else None)
                                                           for k, v in speeds.items()}, "skipped": notes}


def main() -> None:
    args = parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("error: no CUDA device: run on a GPU machine, or pass --dry-run for the CPU rehearsal")
    # stdout is the JSON alone: what DeepSpeed and the engine print goes to stderr until then
    stdout = os.dup(1)
    os.dup2(2, 1)
    c = DRY if args.dry_run else GPU
    device = torch.device("cpu" if args.dry_run else "cuda")
    started = time.perf_counter()
    report = {"dry_run": args.dry_run, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "flash_attn_installed": FLASH_ATTN_INSTALLED}
    report["flash_attn_tests"] = flash_attn_tests()
    peak = matmul_peak(c["matmul_n"], c["dtype"], device)
    report["matmul_peak_tflops"] = {"dtype": str(c["dtype"]), "n": c["matmul_n"], "tflops": significant(peak / 1e12)}
    report["attention"] = attention_speeds(c, device)
    report["zero3_step"] = zero3_step(c, peak)
    report["seconds"] = round(time.perf_counter() - started, 1)
    sys.stdout.flush()
    os.dup2(stdout, 1)
    print(json.dumps(report, indent=2), flush=True)


if __name__ == "__main__":
    main()
