"""Everything a user can get wrong, checked before any process group exists.

Recipe, tokenizer, model config, shards and DeepSpeed config are resolved here, in every rank's process
and once more by `launch/pretrain.sh` before it starts the ranks, so a mistake is one `error:` line
instead of a traceback from inside a collective.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from data_pipeline import check_shards, load_tokenizer
from pretrain.ds_config import build_ds_config
from pretrain.model import ModelConfig, model_preset
from pretrain.recipe import ModelSection, Recipe, RecipeError, load_recipe


@dataclass
class Setup:
    recipe: Recipe
    tokenizer: object
    model_config: ModelConfig
    ds_config: dict
    world_size: int


def build_model_config(section: ModelSection, tokenizer) -> ModelConfig:
    overrides = {"vocab_size": len(tokenizer), **section.overrides}
    try:
        config = model_preset(section.preset, **overrides)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"model: {err}") from err
    if config.vocab_size != len(tokenizer):
        raise RecipeError(f"the tokenizer has {len(tokenizer)} tokens but the model vocabulary has "
                          f"{config.vocab_size}: use the tokenizer the model was trained with, or drop "
                          "model.overrides.vocab_size")
    return config


def prepare(args: argparse.Namespace) -> Setup:
    resume = args.resume
    recipe = load_recipe(args.recipe, args)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    tokenizer = load_tokenizer(recipe.data.tokenizer)
    model_config = build_model_config(recipe.model, tokenizer)
    check_shards(recipe.data.train, world_size=world_size, num_workers=recipe.data.num_workers,
                 mode=recipe.data.mode)
    if recipe.data.val:
        check_shards(recipe.data.val, world_size=1, num_workers=1)
    if recipe.checkpoint.keep < 1:
        raise RecipeError(f"checkpoint.keep is {recipe.checkpoint.keep}: keep at least 1 checkpoint")
    ds_config = build_ds_config(recipe.dist.ds_config, recipe.schedule, world_size)
    if resume == "none" and (recipe.run_path / "checkpoints" / "latest").is_file():
        raise RecipeError(f"run {recipe.run_path} already has checkpoints: pass --resume auto to continue it, or "
                          "--name to start a new run")
    return Setup(recipe, tokenizer, model_config, ds_config, world_size)
