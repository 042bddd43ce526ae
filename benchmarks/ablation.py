"""Issue 13's ablation: what each piece of ALBEF's objective, and the caption-word and word-swap ones, buy on
the embedded default.

Trains one run per row, one after the other, with `launch/pretrain.sh --recipe tiny_synthetic` (2 CPU ranks
unless GPUS_PER_NODE says otherwise), the same steps, seed, data and order for every row, and evaluates each
at its last step on the 1,000 val images: text-to-image and image-to-text R@1/5/10 by ITC, the held-out
hard-triple ITM accuracy, and the masked-token accuracy (the last logged training batch's). Prints one JSON
object, the rows side by side, then a Markdown table.

    python -m benchmarks.ablation [--steps 120] [--out /tmp/ablation] [--rows itc,mlm,words,swap]

A row whose run directory already holds an eval.json of the same steps is read, not trained again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN_NAME = "tiny-synthetic"  # the recipe's `name`: runs land in <run_dir>/<name>
NO_SWAP = ["--data.swap_negatives", "[]"]  # the recipe's word-swap ITC negatives off
ALBEF = ["--model.caption_words_weight", "0", *NO_SWAP]  # ALBEF's own losses only
ROWS: dict[str, tuple[str, list[str]]] = {
    "itc": ("ITC only", [*ALBEF, "--model.overrides", "{weight_itm: 0, weight_mlm: 0}"]),
    "itm": ("+ ITM", [*ALBEF, "--model.overrides", "{weight_mlm: 0}"]),
    "mlm": ("+ MLM (ALBEF)", ALBEF),
    "mod": ("+ MoD", [*ALBEF, "--model.momentum_distillation", "true"]),
    "queue": ("+ queue (1,024)", [*ALBEF, "--model.momentum_distillation", "true", "--model.queue_size", "1024"]),
    "co_attention": ("co-attention instead of cross-attention", [*ALBEF, "--model.fusion", "co_attention"]),
    "words": ("+ caption words", NO_SWAP),
    "swap": ("+ word-swap ITC negatives (the default)", []),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=120, help="training steps of every row")
    p.add_argument("--out", default="/tmp/ablation", help="one run directory per row under it")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    p.add_argument("--itm-rerank-k", type=int, default=8, help="the evaluation's ITM re-rank depth (> 0: it "
                   "also measures the held-out ITM accuracy)")
    args = p.parse_args(argv)
    unknown = sorted(set(args.rows.split(",")) - set(ROWS))
    if unknown:
        p.error(f"unknown row(s) {', '.join(unknown)}; use {', '.join(ROWS)}")
    if args.steps < 1 or args.itm_rerank_k < 1:
        p.error("--steps and --itm-rerank-k must be at least 1")
    return args


def train_row(row: str, args: argparse.Namespace) -> Path:
    """The row's run directory, trained unless it already holds this many steps' evaluation."""
    run_dir = Path(args.out) / row
    run = run_dir / RUN_NAME
    if _last_log(run).get("step") == args.steps and (run / "eval.json").is_file():
        return run
    command = ["bash", str(ROOT / "launch" / "pretrain.sh"), "--recipe", "tiny_synthetic",
               "--schedule.max_steps", str(args.steps), "--eval.every", str(args.steps),
               "--eval.itm_rerank_k", str(args.itm_rerank_k), "--checkpoint.every", "0",
               "--logging.run_dir", str(run_dir), *ROWS[row][1]]
    print(f"[ablation] {row}: {' '.join(command)}", file=sys.stderr, flush=True)
    env = {**os.environ, "PYTHON": os.environ.get("PYTHON", sys.executable)}
    subprocess.run(command, cwd=ROOT, env=env, check=True)
    return run


def _last_log(run: Path) -> dict:
    """The last metrics.jsonl line that logged training metrics ({} if none)."""
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    logged = [json.loads(line) for line in lines if '"train/mlm_accuracy"' in line]
    return logged[-1] if logged else {}


def row_result(run: Path) -> dict:
    evaluation, log = json.loads((run / "eval.json").read_text()), _last_log(run)
    itc = evaluation["itc"]
    return {
        "t2i": {k: round(v, 4) for k, v in itc["t2i"].items()},
        "i2t": {k: round(v, 4) for k, v in itc["i2t"].items()},
        "itm_accuracy_held_out": round(evaluation["itm_accuracy"], 4),
        "t2i_r1_itm_reranked": round(evaluation["t2i"]["r1"], 4),
        "i2t_r1_itm_reranked": round(evaluation["i2t"]["r1"], 4),
        "mlm_accuracy": round(log["train/mlm_accuracy"], 4),
        "step": log["step"],
        "loss": {k.removeprefix("loss/"): round(v, 4) for k, v in log.items() if k.startswith("loss/")},
    }


def markdown(results: dict) -> str:
    lines = ["| row | t2i R@1 | R@5 | R@10 | i2t R@1 | R@5 | R@10 | ITM acc. (held out) | masked-token acc. "
             "| t2i / i2t R@1 after ITM re-rank |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row, r in results.items():
        cells = [*(r["t2i"][k] for k in ("r1", "r5", "r10")), *(r["i2t"][k] for k in ("r1", "r5", "r10")),
                 r["itm_accuracy_held_out"], r["mlm_accuracy"]]
        reranked = f"{r['t2i_r1_itm_reranked']:.3f} / {r['i2t_r1_itm_reranked']:.3f}"
        lines.append(f"| {ROWS[row][0]} | " + " | ".join(f"{c:.3f}" for c in cells) + f" | {reranked} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = {row: row_result(train_row(row, args)) for row in args.rows.split(",")}
    print(json.dumps({"steps": args.steps, "itm_rerank_k": args.itm_rerank_k, "rows": results}, indent=1))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
