"""Training metrics: throughput/MFU arithmetic, memory, and the rank-0 TensorBoard + console output."""

from __future__ import annotations

import json
import resource
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter

from pretrain.train.reliability.files import replace_text


def memory_gb() -> float:
    """Peak accelerator memory on CUDA, else peak resident memory of this process."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def mfu(flops_per_sample: float, samples_per_s: float, world_size: int, peak_tflops: float) -> float:
    return flops_per_sample * samples_per_s / (world_size * peak_tflops * 1e12)


class ThroughputWindow:
    """Speed figures over the steps since the last log line: samples/s, tokens/s, MFU, data wait, memory."""

    def __init__(self, flops_per_sample: Callable[[float], float], samples_per_step: int, world_size: int,
                 peak_tflops: float):
        # FLOPs depend on the real (non-padding) caption tokens, which only the batches tell
        self.flops_per_sample, self.samples_per_step = flops_per_sample, samples_per_step
        self.world_size, self.peak_tflops = world_size, peak_tflops
        self.reset()

    def reset(self) -> None:
        self.start, self.steps, self.data_wait, self.tokens = time.perf_counter(), 0, 0.0, 0

    def add_step(self, data_wait: float, tokens: int) -> None:
        self.steps += 1
        self.data_wait += data_wait
        self.tokens += tokens

    def scalars(self, mean_tokens_per_rank: float) -> dict[str, float]:
        elapsed = time.perf_counter() - self.start
        samples_per_s = self.samples_per_step * self.steps / elapsed
        tokens_per_caption = mean_tokens_per_rank * self.world_size / (self.samples_per_step * self.steps)
        flops = self.flops_per_sample(tokens_per_caption)
        return {
            "perf/samples_per_s": samples_per_s,
            "perf/tokens_per_s": mean_tokens_per_rank * self.world_size / elapsed,
            "perf/mfu": mfu(flops, samples_per_s, self.world_size, self.peak_tflops),
            "perf/data_wait_s": self.data_wait / self.steps,
            "perf/data_wait_fraction": self.data_wait / elapsed,
            "perf/memory_gb": memory_gb(),
        }


class TrainLog:
    """TensorBoard plus metrics.jsonl (one JSON line per logged step, for scripts), on rank 0 only.

    Every call is a no-op on other ranks so the training loop needs no rank checks.
    """

    def __init__(self, run_path: Path, enabled: bool, resume_step: int = 0):
        # A resumed run repeats the steps after its checkpoint: drop what the interrupted run logged for them.
        self.writer = self.jsonl = None
        if enabled:
            self.writer = SummaryWriter(str(run_path), purge_step=resume_step + 1 if resume_step else None)
            jsonl = run_path / "metrics.jsonl"
            kept = [line for line in (jsonl.read_text().splitlines() if jsonl.is_file() else [])
                    if _logged_step(line) <= resume_step]
            replace_text(jsonl, "".join(line + "\n" for line in kept))  # a kill now must not lose the log
            self.jsonl = jsonl.open("a")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)
            self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
            self.jsonl.flush()

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer:
            self.writer.add_text(tag, text, step)

    def image(self, tag: str, chw: torch.Tensor, step: int) -> None:
        if self.writer:
            self.writer.add_image(tag, chw, step)

    def retrieval(self, step: int, metrics: dict, picture: torch.Tensor) -> None:
        """Recall@k scalars and the retrieval picture (pretrain.eval.picture: [3, H, W])."""
        self.scalars(step, {f"eval/{d}_{k}": v for d in ("i2t", "t2i") for k, v in metrics[d].items()})
        self.image("eval/retrieval_examples", picture, step)

    def close(self) -> None:
        if self.writer:
            self.writer.close()
            self.jsonl.close()


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; a line torn by a crash mid-write is dropped (infinitely late)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def console_line(step: int, max_steps: int, values: dict[str, float]) -> str:
    keys = ("loss/total", "loss/itc", "loss/itm", "loss/mlm", "loss/words", "train/itm_accuracy", "train/mlm_accuracy",
            "train/vqa_score", "train/lr",
            "train/grad_norm", "perf/samples_per_s", "perf/mfu", "perf/data_wait_fraction")
    parts = [f"step {step}/{max_steps}"]
    for key in keys:
        if key in values and not (key.startswith("loss/") and values[key] == 0):  # exactly 0: an objective off
            parts.append(f"{key.split('/')[-1]} {values[key]:.4g}")
    return " | ".join(parts)


def step_scalars(values: dict[str, float], lr: float, grad_norm) -> dict[str, float]:
    """The model's step outputs (rank means) under their TensorBoard tags: `loss` as loss/total, `loss_x` as
    loss/x, any other output `y` as train/y (the loop's `tokens` count is not an output)."""
    tags = {}
    for name, value in values.items():
        if name == "loss":
            tags["loss/total"] = value
        elif name.startswith("loss_"):
            tags[f"loss/{name.removeprefix('loss_')}"] = value
        elif name != "tokens":
            tags[f"train/{name}"] = value
    return {**tags, "train/lr": lr, "train/grad_norm": float(grad_norm or 0.0)}


def mean_over_ranks(values: dict, device: torch.device) -> dict[str, float]:
    """Mean of each value over ranks, on the engine's device (NCCL reduces device tensors only)."""
    keys = sorted(values)
    tensor = torch.stack([torch.as_tensor(values[k], dtype=torch.float64, device=device).reshape(()) for k in keys])
    dist.all_reduce(tensor)
    return dict(zip(keys, (tensor / dist.get_world_size()).tolist()))


def skipped_over_ranks(loader) -> dict[str, float]:
    """The loaders' skipped-sample counts summed over ranks, per reason and in total, and their retried reads."""
    counts = [None] * dist.get_world_size()
    stats = loader.stats()
    dist.all_gather_object(counts, (stats["skipped"], stats["read_retries"]))
    total: dict[str, float] = defaultdict(float)
    for rank_counts, retries in counts:
        for reason, n in rank_counts.items():
            total[f"data/skipped_{reason}"] += n
            total["data/skipped_total"] += n
        total["data/read_retries"] += retries
    total.setdefault("data/skipped_total", 0.0)
    return dict(total)
