"""What each fine-tuning method costs and gains, per task, on the same steps and data for every row: trainable
parameters, optimizer-state and checkpoint bytes, peak memory, step time and the task metric, next to zero-shot
retrieval (the base export evaluated as it is). Each row is a real run of `python -m pretrain.finetune` through
the launcher (2 CPU ranks, ZeRO-3). Prints one JSON object; docs/finetuning.md has the table.

    python -m benchmarks.bench_finetune --base runs/tiny-synthetic/export --vqa-steps 100 --retrieval-steps 40

`--preset base` measures the costs at a model's real size without training it: the base is a seeded,
initialised export of that preset (built once under --run-dir, nothing downloaded), each row runs a few steps
with no evaluation (metric: "not trained: size only"), and `--prune` deletes each run's checkpoints once measured.

    python -m benchmarks.bench_finetune --preset base --tasks vqa --vqa-steps 2 --batch 1 --prune --run-dir /tmp/b
"""

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ("none", "lora", "adapter", "prefix")


def run_job(task: str, method: str, args: argparse.Namespace) -> dict:
    name = f"bench-{task}-{method}{args.label}"
    steps = args.vqa_steps if task == "vqa" else args.retrieval_steps
    flags = ["--recipe", f"{task}_synthetic", "--name", name, "--logging.run_dir", str(args.run_dir),
             "--peft.method", method, "--base.path", str(args.base), "--schedule.max_steps", str(steps),
             "--schedule.warmup_steps", str(max(1, steps // 10)), "--schedule.micro_batch_size", str(args.batch),
             "--checkpoint.every", "0", "--eval.every", "0", "--logging.every", str(max(1, steps // 5)),
             "--optim.lr", str(args.full_lr if method == "none" else args.peft_lr)]
    if method != "none":
        flags += shlex.split(args.peft_args)
    if task == "vqa":
        flags += ["--data.train", str(args.vqa_shards / "train")]
    if args.preset:  # size only: no evaluation at this size on a CPU
        flags += ["--data.val", "null"]
    elif task == "vqa":
        flags += ["--data.val", str(args.vqa_shards / "val")]
    env = {**os.environ, "ENTRY": "finetune", "GPUS_PER_NODE": "2", "PYTHON": sys.executable,
           "MASTER_PORT": str(args.port)}
    proc = subprocess.run(["bash", "launch/pretrain.sh", *flags], cwd=REPO, env=env, text=True, capture_output=True)
    if proc.returncode:
        raise SystemExit(f"{task}/{method} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    run_dir = args.run_dir / name
    trained, total = map(int, re.search(r"(\d+) of (\d+) parameters trainable", proc.stdout).groups())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    speed = [r for r in rows if "perf/samples_per_s" in r][1:]  # the first window holds the start-up
    samples_per_step = 2 * args.batch
    tag = sorted((run_dir / "checkpoints").glob("step*"))[-1]
    metric = ("not trained: size only" if args.preset
              else metric_of(task, json.loads((run_dir / "eval.json").read_text())))
    row = {
        "trainable": trained, "trainable_pct": round(100 * trained / total, 3), "total": total,
        "optimizer_state_bytes": sum(f.stat().st_size for f in tag.glob("*optim_states.pt")),
        "checkpoint_bytes": sum(f.stat().st_size for f in tag.iterdir()),
        "saved_bytes": sum(f.stat().st_size for f in (run_dir / "finetuned").iterdir()),
        "peak_memory_gb_rank0": round(max(r["perf/memory_gb"] for r in rows if "perf/memory_gb" in r), 3),
        "step_s": round(statistics.median(samples_per_step / r["perf/samples_per_s"] for r in speed), 3),
        "metric": metric,
    }
    if args.prune:
        shutil.rmtree(run_dir / "checkpoints")
    return row


def metric_of(task: str, metrics: dict) -> dict:
    if task == "vqa":
        return {"vqa_accuracy": round(100 * metrics["overall"], 2),
                **{t: round(100 * v, 2) for t, v in metrics["per_type"].items()}}
    return {f"{d}_{k}": round(100 * v, 2) for d in ("i2t", "t2i") for k, v in metrics[d].items()}


def initialised_export(preset: str, tokenizer_dir: Path, out: Path) -> Path:
    """A seeded, untrained export of `preset` with the project's tokenizer: what fine-tuning needs of a base."""
    import torch

    from data_pipeline import load_tokenizer
    from pretrain.model import ALBEF, model_preset
    from pretrain.train.export import save_export

    if not (out / "model.safetensors").is_file():
        tokenizer = load_tokenizer(str(tokenizer_dir))
        torch.manual_seed(0)
        save_export(ALBEF(model_preset(preset, vocab_size=len(tokenizer))), tokenizer, out)
    return out


def zero_shot(args: argparse.Namespace) -> dict:
    out = args.run_dir / "zero_shot_eval.json"
    subprocess.run([sys.executable, "-m", "pretrain.evaluate", "--checkpoint", str(args.base), "--data",
                    "data/shards/synthetic/val", "--out", str(out)], cwd=REPO, check=True, capture_output=True)
    return metric_of("retrieval", json.loads(out.read_text()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=Path("runs/tiny-synthetic/export"))
    parser.add_argument("--run-dir", type=Path, default=Path("runs/bench-finetune"))
    parser.add_argument("--tasks", default="vqa,retrieval")
    parser.add_argument("--vqa-shards", type=Path, default=Path("data/shards/synthetic_vqa"),
                        help="the VQA shards (train/ and val/), as make vqa-shards writes them")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--vqa-steps", type=int, default=100)
    parser.add_argument("--retrieval-steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=32, help="micro-batch per rank")
    parser.add_argument("--full-lr", type=float, default=1e-4, help="learning rate of full fine-tuning")
    parser.add_argument("--peft-lr", type=float, default=1e-3, help="learning rate of the PEFT methods")
    parser.add_argument("--port", type=int, default=29731)
    parser.add_argument("--preset", help="size only: fine-tune a seeded, initialised export of this model preset "
                        "(e.g. base) instead of --base, without evaluation")
    parser.add_argument("--tokenizer", type=Path, default=Path("data/tokenizer"), help="the --preset export's")
    parser.add_argument("--prune", action="store_true", help="delete each run's checkpoints once measured")
    parser.add_argument("--peft-args", default="", help="more flags for the PEFT rows, e.g. "
                        "\"--peft.targets '.*(qkv|query|key_value)' --peft.rank 4\"")
    parser.add_argument("--label", default="", help="a suffix for this invocation's row and run names, e.g. -qkv-r4")
    args = parser.parse_args(argv)
    if args.preset:
        args.base = initialised_export(args.preset, args.tokenizer, args.run_dir / f"{args.preset}-export")
    result = {"setup": {k: str(v) for k, v in vars(args).items()}, "rows": {}}
    for task in args.tasks.split(","):
        if task == "retrieval" and not args.preset:
            result["rows"]["retrieval/zero-shot"] = {"metric": zero_shot(args)}
        for method in args.methods.split(","):
            row = f"{task}/{method}{args.label}"
            result["rows"][row] = run_job(task, method, args)
            print(json.dumps({row: result["rows"][row]}), file=sys.stderr, flush=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
