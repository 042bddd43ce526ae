"""`python -m pretrain.train`: ALBEF pretraining (ITC + ITM + MLM) on a DeepSpeed ZeRO-3 engine.

Launch with `deepspeed [launcher flags] launch/pretrain.sh [flags]` or `bash launch/pretrain.sh [flags]`.
User mistakes are caught before any process group exists, in `pretrain.train.preflight`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from tqdm import tqdm

from data_pipeline import DataError
from pretrain.train.loop import train
from pretrain.train.preflight import Setup, prepare
from pretrain.train.recipe import Recipe, RecipeError, add_recipe_arguments
from pretrain.train.reliability.faults import RunHalted


def parse_args(argv: list[str] | None = None, recipe_cls: type = Recipe, prog: str = "python -m pretrain.train",
               description: str = "ALBEF-style vision-language pretraining on DeepSpeed.") -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=f"{description} Options after --recipe override it.")
    parser.add_argument("--recipe", default=None,
                        help="YAML recipe: a path or a name in pretrain/recipes/ (e.g. tiny_synthetic)")
    parser.add_argument("--resume", default="none",
                        help="'auto': continue from the newest complete checkpoint of this run, if any; 'none'")
    parser.add_argument("--validate-only", action="store_true",
                        help="check recipe, data, tokenizer and DeepSpeed config, then exit")
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                        help=argparse.SUPPRESS)  # passed by the DeepSpeed launcher
    add_recipe_arguments(parser, recipe_cls)
    args = parser.parse_args(argv)
    if args.resume not in ("none", "auto"):
        parser.error(f"--resume must be 'auto' or 'none', got {args.resume!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    return run_app(parse_args(argv), prepare)


def run_app(args: argparse.Namespace, prepare: Callable[[argparse.Namespace], Setup]) -> int:
    """Preflight (`prepare`, before any process group), then the training loop, with the apps' exit codes."""
    try:
        setup = prepare(args)
    except (RecipeError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for warning in setup.warnings:
        print(warning, file=sys.stderr)
    if args.validate_only:
        print(f"[vlpretrain] recipe, data, tokenizer and DeepSpeed config are valid for world_size={setup.world_size}")
        return 0
    try:
        train(setup, args.resume)
    except (RecipeError, DataError) as err:  # e.g. a checkpoint's loader state that the recipe contradicts
        tqdm.write(f"error: {err}", file=sys.stderr)
        return 2
    except RunHalted as err:  # the process group is gone by now: the launcher's RANK says who reports
        if not err.agreed or os.environ.get("RANK", "0") == "0":
            tqdm.write(f"error: {err}", file=sys.stderr)  # on a line of its own, not after the progress bar
        return 1
    return 0
