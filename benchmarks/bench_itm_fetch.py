"""Bytes each rank sends per step to fetch ITM hard negatives: today's way (gather every rank's image and text
token states with gradient, index one row per sample; backward all-reduces the gathered gradient) against
fetch_rows (all-to-all of the wanted indices and rows only; backward returns each row's gradient to its owner).

Runs both ways for real on --world CPU ranks over gloo, at the base preset's dims by default (ALBEF's batch:
64 per GPU, 257 image tokens of 256 px / 16, 30 text tokens, width 768, bf16), with negatives drawn uniformly
from the global batch, and counts what each collective is handed: all_gather sends (W-1) x its input,
all_reduce 2 (W-1)/W x its tensor (ring algorithms), all_to_all the rows addressed to other ranks. Prints
one JSON object: measured per rank (mean over ranks), and both ways worked out at --project-world ranks from
the same rules.

    python -m benchmarks.bench_itm_fetch [--world 2] [--batch 64] [--project-world 8]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pretrain.distributed as distributed
from pretrain.distributed import fetch_rows, gather_no_grad, gather_with_grad


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2, help="ranks to run (CPU processes)")
    p.add_argument("--batch", type=int, default=64, help="samples per rank")
    p.add_argument("--image-tokens", type=int, default=257)
    p.add_argument("--text-tokens", type=int, default=30)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--project-world", type=int, default=8)
    return p.parse_args()


def count_collectives(sent: Counter) -> None:
    """Wrap the collectives pretrain.distributed uses so that each adds what this rank sends to `sent`."""
    world = dist.get_world_size()
    real_gather, real_reduce, real_all_to_all = distributed._all_gather_single, dist.all_reduce, dist.all_to_all_single

    def gather(out, x):
        sent["all_gather"] += (world - 1) * x.nbytes
        return real_gather(out, x)

    def reduce(t, *args, **kwargs):
        sent["all_reduce"] += 2 * (world - 1) * t.nbytes // world
        return real_reduce(t, *args, **kwargs)

    def all_to_all(out, x, output_split_sizes=None, input_split_sizes=None, *args, **kwargs):
        splits = input_split_sizes or [len(x) // world] * world
        row = x.nbytes // max(1, len(x))
        sent["all_to_all"] += (len(x) - splits[dist.get_rank()]) * row
        return real_all_to_all(out, x, output_split_sizes, input_split_sizes, *args, **kwargs)

    distributed._all_gather_single, dist.all_reduce, dist.all_to_all_single = gather, reduce, all_to_all


def itm_negatives(a: argparse.Namespace, fetch, rank: int) -> None:
    """The forward's three fetches (text states, their padding, image states) and their backward."""
    g = torch.Generator().manual_seed(rank)
    text = torch.randn(a.batch, a.text_tokens, a.hidden, generator=g).bfloat16().requires_grad_()
    image = torch.randn(a.batch, a.image_tokens, a.hidden, generator=g).bfloat16().requires_grad_()
    mask = torch.ones(a.batch, a.text_tokens, dtype=torch.long)
    global_rows = a.batch * dist.get_world_size()
    negative_texts, negative_images = torch.randint(0, global_rows, (2, a.batch), generator=g)
    rows = fetch["grad"](text, negative_texts), fetch["grad"](image, negative_images)
    fetch["no_grad"](mask, negative_texts)
    sum(r.float().sum() for r in rows).backward()


def on_rank(rank: int, a: argparse.Namespace, store: str, out) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=a.world)
    ways = {"gather_then_index": {"grad": lambda x, i: gather_with_grad(x)[i],
                                  "no_grad": lambda x, i: gather_no_grad(x)[i]},
            "fetch_rows": {"grad": fetch_rows, "no_grad": fetch_rows}}
    sent = Counter()
    count_collectives(sent)
    result = {}
    for name, fetch in ways.items():
        sent.clear()
        itm_negatives(a, fetch, rank)
        result[name] = dict(sent)
    out[rank] = result
    dist.destroy_process_group()


def projected(a: argparse.Namespace, world: int) -> dict:
    """Bytes per rank and step from the same rules, negatives uniform over the global batch."""
    element, row_tokens = 2, a.text_tokens + a.image_tokens
    states = a.batch * row_tokens * a.hidden * element  # this rank's text + image states
    mask = a.batch * a.text_tokens * 8
    remote = a.batch * (world - 1) / world  # rows expected from other ranks, per fetch
    gather = (world - 1) * (states + mask) + 2 * (world - 1) * states  # forward gathers + backward all-reduces
    fetch = (3 * remote * 8  # indices (text, mask, image)
             + remote * row_tokens * a.hidden * element * 2 + remote * a.text_tokens * 8)  # rows there and back
    return {"world": world, "gather_then_index_mb": round(gather / 1e6, 1), "fetch_rows_mb": round(fetch / 1e6, 1),
            "ratio": round(gather / fetch, 1)}


def main() -> None:
    a = parse_args()
    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(on_rank, args=(a, str(Path(tmp) / "store"), out), nprocs=a.world, join=True)
        results = dict(out)
    measured = {}
    for way in ("gather_then_index", "fetch_rows"):
        per_rank = [sum(results[r][way].values()) for r in range(a.world)]
        kinds = Counter()
        for r in range(a.world):
            kinds.update(results[r][way])
        measured[way] = {"mb_sent_per_rank": round(sum(per_rank) / a.world / 1e6, 1),
                         "by_collective_mb": {k: round(v / a.world / 1e6, 1) for k, v in kinds.items()}}
    print(json.dumps({"dims": {"batch_per_rank": a.batch, "image_tokens": a.image_tokens,
                               "text_tokens": a.text_tokens, "hidden": a.hidden, "dtype": "bfloat16"},
                      "measured": {"world": a.world, **measured},
                      "projected": [projected(a, a.world), projected(a, a.project_world)]}, indent=2))


if __name__ == "__main__":
    main()
