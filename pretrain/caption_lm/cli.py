"""`python -m pretrain.caption_lm --recipe caption_lm_synthetic`: the embedded default LM of instruction tuning,
pretrained on the captions' text on the pretraining app's DeepSpeed engine, loop, checkpoints and launcher
(`ENTRY=caption_lm bash launch/pretrain.sh --recipe caption_lm_synthetic`).

Its tokenizer is trained once beforehand (`python -m data_pipeline.lm_tokenizer`); the result,
<run>/export, is a Hub-style directory that `python -m pretrain.instruct` takes as `lm.name`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from data_pipeline import check_shards, load_tokenizer
from pretrain.caption_lm.recipe import CaptionLMRecipe
from pretrain.caption_lm.task import CaptionLMTask
from pretrain.train import cli
from pretrain.train.preflight import Setup, prepare_run
from pretrain.train.recipe import RecipeError, load_recipe


def prepare(args: argparse.Namespace) -> Setup:
    """The checks before any process group exists: the LM tokenizer, the shards and the run directory."""
    from transformers import AutoTokenizer

    recipe = load_recipe(args.recipe, args, CaptionLMRecipe)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if not (Path(recipe.lm.tokenizer) / "tokenizer.json").is_file():
        raise RecipeError(f"lm.tokenizer {recipe.lm.tokenizer} is not a trained LM tokenizer: make it with python -m "
                          f"data_pipeline.lm_tokenizer --shards {recipe.data.train} --out {recipe.lm.tokenizer}")
    lm_tokenizer = AutoTokenizer.from_pretrained(recipe.lm.tokenizer)
    if recipe.data.max_len > recipe.lm.context:
        raise RecipeError(f"data.max_len {recipe.data.max_len} exceeds lm.context {recipe.lm.context}: lower one "
                          "or raise the other")
    check_shards(recipe.data.train, world_size=world_size, num_workers=recipe.data.num_workers, mode=recipe.data.mode)
    if recipe.data.val:
        check_shards(recipe.data.val, world_size=1, num_workers=1)
    ds_config = prepare_run(recipe, args.resume, world_size)
    loader_tokenizer = load_tokenizer(recipe.data.tokenizer)  # the shared loader's caption copy (unused)
    return Setup(recipe, loader_tokenizer, None, ds_config, world_size, task=CaptionLMTask(lm_tokenizer))


def main(argv: list[str] | None = None) -> int:
    args = cli.parse_args(argv, CaptionLMRecipe, prog="python -m pretrain.caption_lm",
                          description="Pretraining of the embedded default causal LM on caption text.")
    return cli.run_app(args, prepare)



