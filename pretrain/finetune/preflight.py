"""Everything a user can get wrong in a fine-tuning run, checked before any process group exists (in the
launcher and in every rank), as the pretraining app's preflight does: the base, the method's targets and
sizes, the answer vocabulary, the data, and a resume onto the base the run started from."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace

import torch

from data_pipeline import DataError, check_shards, load_tokenizer
from data_pipeline.vqa import answer_vocabulary
from pretrain.finetune.base import open_base
from pretrain.finetune.recipe import FinetuneRecipe
from pretrain.finetune.tasks import BASE_FILE, RetrievalTask, VQATask
from pretrain.model import ModelConfigError
from pretrain.model.peft import PeftConfig, PeftConfigError, matching_modules
from pretrain.train.preflight import Setup, prepare_run
from pretrain.train.recipe import RecipeError, load_recipe

TASKS = ("vqa", "retrieval")
# ModelConfig fields a fine-tuning run may change: how the model runs, never its shape
EXECUTION_FIELDS = ("attention", "grad_checkpointing", "dropout")


def prepare(args: argparse.Namespace) -> Setup:
    recipe = load_recipe(args.recipe, args, FinetuneRecipe)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if recipe.task.name not in TASKS:
        raise RecipeError(f"task.name {recipe.task.name!r} is unknown: use one of {', '.join(TASKS)}")
    base = open_base(recipe.base.path)
    model_config = execution_overrides(base.config, recipe.model.overrides)
    tokenizer_path = recipe.data.tokenizer or base.tokenizer
    if tokenizer_path is None:
        raise RecipeError(f"base.path {base.path} has no tokenizer/: set data.tokenizer to the tokenizer it was "
                          "trained with")
    tokenizer = load_tokenizer(tokenizer_path)
    if len(tokenizer) != model_config.vocab_size:
        raise RecipeError(f"the tokenizer {tokenizer_path} has {len(tokenizer)} tokens but the base model "
                          f"{model_config.vocab_size}: use the tokenizer the base was trained with")
    if recipe.data.max_len > model_config.max_position:
        raise RecipeError(f"data.max_len {recipe.data.max_len} exceeds the base model's {model_config.max_position} "
                          "positions: lower data.max_len")
    check_shards(recipe.data.train, world_size=world_size, num_workers=recipe.data.num_workers,
                 mode=recipe.data.mode)
    if recipe.data.val:
        check_shards(recipe.data.val, world_size=1, num_workers=1)
    peft = PeftConfig(**vars(recipe.peft))
    if recipe.task.name == "vqa":
        task = VQATask(base.state_dict, base.digest, peft, vqa_answers(recipe))
    else:
        task = RetrievalTask(base.state_dict, base.digest, peft)
    check_targets(task, model_config, peft)
    ds_config = prepare_run(recipe, args.resume, world_size)
    if args.resume == "auto":
        check_same_base(recipe, base.digest)
    return Setup(recipe, tokenizer, model_config, ds_config, world_size, task=task)


def execution_overrides(config, overrides: dict):
    shape = sorted(set(overrides) - set(EXECUTION_FIELDS))
    if shape:
        raise RecipeError(f"model.overrides {shape} would change the base model's shape: a fine-tuning run may "
                          f"only set {', '.join(EXECUTION_FIELDS)}")
    try:
        return replace(config, **overrides)
    except ModelConfigError as err:
        raise RecipeError(f"model.overrides: {err}") from None


def vqa_answers(recipe: FinetuneRecipe) -> tuple[str, ...]:
    if recipe.task.answers <= 0:
        raise RecipeError(f"task.answers is {recipe.task.answers}: classify over at least one answer")
    try:
        vocabulary = answer_vocabulary(recipe.data.train, recipe.task.answers)
    except DataError as err:
        raise RecipeError(str(err)) from None
    if vocabulary.coverage < recipe.task.min_answer_coverage:
        raise RecipeError(f"the {len(vocabulary.answers)} most frequent answers cover {vocabulary.coverage:.1%} of "
                          f"the {vocabulary.total} training answers, below task.min_answer_coverage "
                          f"{recipe.task.min_answer_coverage:.1%}: raise task.answers or lower the bound")
    return vocabulary.answers


def check_targets(task, model_config, peft: PeftConfig) -> None:
    """The method's targets on the task's model, built on the meta device (no memory, no initialisation)."""
    with torch.device("meta"):
        model = task.make_model(model_config)
    try:
        matching_modules(model, peft)
    except PeftConfigError as err:
        raise RecipeError(str(err)) from None


def check_same_base(recipe: FinetuneRecipe, digest: str) -> None:
    """A run resumes only onto the base it started from: its checkpoints hold no frozen weight."""
    recorded = recipe.run_path / BASE_FILE
    if not (recipe.run_path / "checkpoints" / "latest").is_file() or not recorded.is_file():
        return
    started = json.loads(recorded.read_text())
    if started["digest"] != digest:
        raise RecipeError(f"run {recipe.run_path} was started from the base {started['path']} (weight digest "
                          f"{started['digest'][:12]}), but base.path {recipe.base.path} has digest {digest[:12]}: "
                          "resume with the base it started from, or start a new run with --name")
