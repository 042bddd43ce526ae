"""Everything a user can get wrong in an instruction-tuning run, checked before any process group exists (in
the launcher and in every rank): the base and the LM fit each other, the stage, the shards and their
conversations, and the run directory (pretrain.train.preflight.prepare_run)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from data_pipeline import DataError, check_shards, load_tokenizer
from data_pipeline.instructions import check_instruction_set
from pretrain.instruct.recipe import InstructRecipe
from pretrain.instruct.task import InstructTask
from pretrain.model.multimodal_lm import (
    LM_TRAINING,
    STAGES,
    MultimodalLM,
    MultimodalLMError,
    ProjectorConfig,
    is_saved_multimodal,
    load_configs,
)
from pretrain.train.preflight import Setup, prepare_run
from pretrain.train.recipe import RecipeError, load_recipe


def prepare(args: argparse.Namespace) -> Setup:
    recipe = load_recipe(args.recipe, args, InstructRecipe)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    stage = recipe.stage
    if stage.name not in STAGES or stage.lm_training not in LM_TRAINING:
        raise RecipeError(f"stage.name {stage.name!r} / stage.lm_training {stage.lm_training!r}: use a stage of "
                          f"{', '.join(STAGES)} and lm_training of {', '.join(LM_TRAINING)}")
    if not 0 < stage.encoder_lr_scale <= 1 or (stage.encoder_lr_scale != 1 and not stage.train_encoder):
        raise RecipeError(f"stage.encoder_lr_scale {stage.encoder_lr_scale} needs stage.train_encoder true and a "
                          "value in (0, 1]: the encoders train at that fraction of optim.lr")
    if stage.loss_per not in ("token", "conversation"):
        raise RecipeError(f"stage.loss_per {stage.loss_per!r} is unknown: use token or conversation")
    try:
        parts = load_configs(recipe.base.path, recipe.lm.name, recipe.lm.image_tokens, recipe.lm.projector,
                             recipe.lm.fuse_question)
        with torch.device("meta"):  # the LM, tokenizer and projector checks on a model without memory
            MultimodalLM.from_configs(*parts)
    except MultimodalLMError as err:
        raise RecipeError(f"base.path / lm: {err}") from None
    _check_saved_projector(recipe, parts[1])
    encoder_config = parts[0]
    tokenizer_path = recipe.data.tokenizer or _export_tokenizer(recipe.base.path)
    loader_tokenizer = load_tokenizer(tokenizer_path)
    shards = check_shards(recipe.data.train, world_size=world_size, num_workers=recipe.data.num_workers,
                          mode=recipe.data.mode)
    check_instruction_set([shards.shards[0].path])
    if recipe.data.val:
        check_shards(recipe.data.val, world_size=1, num_workers=1)
    ds_config = prepare_run(recipe, args.resume, world_size)
    return Setup(recipe, loader_tokenizer, encoder_config, ds_config, world_size,
                 task=InstructTask(parts, loader_tokenizer))


def _check_saved_projector(recipe: InstructRecipe, saved: ProjectorConfig) -> None:
    """A saved multimodal base (stage 2) keeps its projector: a recipe that asks for another would be ignored."""
    if not is_saved_multimodal(recipe.base.path):
        return
    for key, saved_key in (("image_tokens", "image_tokens"), ("projector", "kind"), ("fuse_question", "fuse_question")):
        wanted, kept = str(getattr(recipe.lm, key)).lower(), str(getattr(saved, saved_key)).lower()
        if wanted != kept:
            raise RecipeError(f"lm.{key} is {wanted} but the base {recipe.base.path} was built with {kept}, which "
                              f"a later stage keeps: pass --lm.{key} {kept}, or train stage 1 with {wanted}")


def _export_tokenizer(base: str) -> str:
    for folder in (Path(base) / "tokenizer", Path("data/tokenizer")):
        if folder.is_dir():
            return str(folder)
    raise DataError(f"{base} has no tokenizer/ for the shared loader's caption copy: set data.tokenizer")
