"""T0/FLAN's finding on our data: does instruction tuning on several phrasings of a task answer phrasings it
never saw better than tuning on one? Two models, the same steps, seed and data (the sets differ only in
the captioning instruction's wording: `make_instructions --train-templates 1` against all six), each through
both stages (`python -m pretrain.instruct`, 2 CPU ranks, ZeRO-3), evaluated on the same held-out set (three
captioning phrasings neither saw, and the VQA questions). Prints one JSON object, the two models side by side.

    python -m benchmarks.bench_instruct_templates --base runs/tiny-synthetic/export --lm runs/caption-lm/export \\
        --vqa data/shards/synthetic_vqa
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from pretrain.model.multimodal_lm import is_saved_multimodal

REPO = Path(__file__).resolve().parents[1]
ARMS = {"one_template": 1, "many_templates": 0}  # --train-templates (0: all)


def make_set(args: argparse.Namespace, out: Path, split: str, templates: int) -> None:
    if (out / split / "manifest.json").is_file():
        return
    flags = ["--captions", str(args.captions), "--out", str(out), "--splits", split, "--quiet",
             "--train-templates", str(templates)] + (["--vqa", str(args.vqa)] if args.vqa else [])
    subprocess.run([sys.executable, "-m", "data_pipeline.make_instructions", *flags], cwd=REPO, check=True)


def train(args: argparse.Namespace, arm: str, stage: int, base: Path) -> Path:
    """One stage of one arm (a finished one is kept: a rerun continues where it stopped); the run directory."""
    name = f"{arm}-stage{stage}"
    if is_saved_multimodal(args.run_dir / name / "export"):
        return args.run_dir / name
    steps = args.stage1_steps if stage == 1 else args.stage2_steps
    flags = ["--recipe", f"instruct_stage{stage}_synthetic", "--name", name, "--logging.run_dir", str(args.run_dir),
             "--base.path", str(base), "--lm.name", str(args.lm), "--data.train", str(args.run_dir / arm / "train"),
             "--data.val", str(args.run_dir / "held_out" / "val"), "--eval.samples", str(args.samples),
             "--checkpoint.every", "0", "--resume", "auto", "--seed", str(args.seed)]
    if steps:  # otherwise the recipe's own schedule
        flags += ["--schedule.max_steps", str(steps), "--schedule.warmup_steps", str(max(1, steps // 10))]
    env = {**os.environ, "ENTRY": "instruct", "GPUS_PER_NODE": "2", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "launch/pretrain.sh", *flags], cwd=REPO, env=env, text=True, capture_output=True)
    if proc.returncode:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return args.run_dir / name


def scores(run: Path) -> dict:
    metrics = json.loads((run / "instruct_eval.json").read_text())
    out = {k: round(v, 4) for k, v in metrics["captioning_held_out_phrasings"].items()}
    if "vqa" in metrics:
        out["vqa_accuracy"] = round(metrics["vqa"]["accuracy"], 4)
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = [row for row in logged if "loss/total" in row][-1]  # the evaluation logs its own rows
    # one misread phrasing moves every average by a third: show each
    by_phrasing = {phrasing: {k: round(v, 4) for k, v in part.items() if k != "held_out"}
                   for phrasing, part in metrics["captioning_by_phrasing"].items() if part["held_out"]}
    return {**out, "final_train_loss": round(final["loss/total"], 4), "by_phrasing": by_phrasing}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=Path("runs/tiny-synthetic/export"), help="pretraining export")
    parser.add_argument("--lm", type=Path, default=Path("runs/caption-lm/export"), help="the caption LM")
    parser.add_argument("--captions", type=Path, default=Path("data/shards/synthetic"), help="caption shard set")
    parser.add_argument("--vqa", type=Path, default=None, help="VQA shard set (both arms train on its questions)")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/bench-instruct-templates"))
    parser.add_argument("--stage1-steps", type=int, default=0, help="0: the stage-1 recipe's (60)")
    parser.add_argument("--stage2-steps", type=int, default=0, help="0: the stage-2 recipe's (6400)")
    parser.add_argument("--seed", type=int, default=0,
                        help="training seed of both arms (initialisation, data order); the data stay the same")
    parser.add_argument("--samples", type=int, default=128,
                        help="val samples evaluated per task (half the captions are asked in held-out phrasings)")
    args = parser.parse_args(argv)
    make_set(args, args.run_dir / "held_out", "val", 0)
    rows = {}
    for arm, templates in ARMS.items():
        make_set(args, args.run_dir / arm, "train", templates)
        stage1 = train(args, arm, 1, args.base)
        rows[arm] = scores(train(args, arm, 2, stage1 / "export"))
    print(json.dumps({"setup": {k: str(v) for k, v in vars(args).items()}, "held_out_phrasings": rows}, indent=1))


if __name__ == "__main__":
    main()
