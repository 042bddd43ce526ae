"""Everything a user can get wrong, checked before any process group exists.

Recipe, tokenizer, model config, shards and DeepSpeed config are resolved here, in every rank's process
and once more by `launch/pretrain.sh` before it starts the ranks, so a mistake is one `error:` line
instead of a traceback from inside a collective.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data_pipeline import DataError, check_shards, load_tokenizer
from data_pipeline.loader import check_sampling_options, epoch_sizes
from data_pipeline.text import check_swap_groups
from data_pipeline.tokenizer import caption_sample, tokenizer_fit
from pretrain import compat
from pretrain.model import ALBEF, ModelConfig, model_preset
from pretrain.train.checkpoint import CheckpointError, check_resumable
from pretrain.train.ds_config import build_ds_config
from pretrain.train.recipe import ModelSection, Recipe, RecipeError, RunRecipe, load_recipe
from pretrain.train.reliability.files import probe_writable
from pretrain.train.task import PretrainTask


@dataclass
class Setup:
    recipe: RunRecipe  # any app's recipe
    tokenizer: object
    model_config: ModelConfig | None  # None for a task without our model (the caption LM)
    ds_config: dict
    world_size: int
    warnings: list[str] = field(default_factory=list)  # printed by rank 0 (and --validate-only)
    task: object = field(default_factory=PretrainTask)  # what is trained: see pretrain.train.task


def build_model_config(section: ModelSection, tokenizer, steps_per_epoch: int = 0,
                       forwards_per_update: int = 1) -> ModelConfig:
    """The preset with the section's fields and overrides; distillation's alpha ramps over `steps_per_epoch`
    training forwards (ALBEF: the first epoch) and its teacher takes one EMA step per optimizer update of
    `forwards_per_update` forwards, unless the overrides say otherwise."""
    fields = {"fusion": section.fusion, "patch_stem": section.patch_stem, "dropout": section.dropout,
              "queue_size": section.queue_size,
              "momentum_distillation": section.momentum_distillation,
              "itm_negative_hardness": section.itm_negative_hardness, "weight_words": section.caption_words_weight}
    overrides = {"vocab_size": len(tokenizer), **fields, **section.overrides}
    if section.vit and overrides["patch_stem"] != "linear":
        raise RecipeError(f"model.vit loads a ViTModel's linear patch embedding, which patch_stem "
                          f"{overrides['patch_stem']!r} does not have: set model.patch_stem linear")
    if overrides["momentum_distillation"]:
        overrides.setdefault("distill_alpha_ramp_steps", steps_per_epoch)
        overrides.setdefault("momentum_every", forwards_per_update)
    try:
        config = model_preset(section.preset, **overrides)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"model: {err}") from err
    if config.vocab_size != len(tokenizer):
        raise RecipeError(f"the tokenizer has {len(tokenizer)} tokens but the model vocabulary has "
                          f"{config.vocab_size}: use the tokenizer the model was trained with, or drop "
                          "model.overrides.vocab_size")
    return config


def check_text_length(recipe: Recipe, config: ModelConfig) -> None:
    if recipe.data.max_len > config.max_position:
        raise RecipeError(f"data.max_len {recipe.data.max_len} exceeds the model's {config.max_position} "
                          f"positions (preset {recipe.model.preset!r}): lower data.max_len or set "
                          "model.overrides.max_position")


def check_swap_negatives(recipe: Recipe) -> None:
    """Word groups that can be swapped."""
    try:
        check_swap_groups(recipe.data.swap_negatives)
    except DataError as err:
        raise RecipeError(str(err)) from None


def prepare(args: argparse.Namespace) -> Setup:
    resume = args.resume
    recipe = load_recipe(args.recipe, args)
    check_limits(recipe)  # (prepare_run checks them again, for the other apps)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    tokenizer = load_tokenizer(recipe.data.tokenizer)
    train_set = check_shards(recipe.data.train, world_size=world_size, num_workers=recipe.data.num_workers,
                             mode=recipe.data.mode)
    epoch = sum(epoch_sizes(train_set, recipe.data.pairs, recipe.data.mode).values())  # images, or pairs
    forwards_per_epoch = math.ceil(epoch / (recipe.schedule.micro_batch_size * world_size))
    model_config = build_model_config(recipe.model, tokenizer, forwards_per_epoch, recipe.schedule.grad_accum)
    check_text_length(recipe, model_config)
    check_swap_negatives(recipe)
    if recipe.data.val:
        check_shards(recipe.data.val, world_size=1, num_workers=1)
    ds_config = prepare_run(recipe, resume, world_size)
    if resume == "auto":
        check_same_model(recipe.run_path, model_config)
    check_teacher_precision(model_config, ds_config, recipe.dist.ds_config)
    warnings = [tokenizer_fit_warning(recipe, tokenizer)] if int(os.environ.get("RANK", "0")) == 0 else []
    return Setup(recipe, tokenizer, model_config, ds_config, world_size, [w for w in warnings if w])


def check_same_model(run_path: Path, config: ModelConfig) -> None:
    """Checkpoints load only into a model with the same parameters: name the fields that changed (say, a
    recipe's new default) rather than fail inside DeepSpeed's load with missing keys. Other changes (loss
    weights, dropout, a schedule-derived ramp) may continue a run."""
    saved_file = run_path / "model_config.json"
    if not ((run_path / "checkpoints" / "latest").is_file() and saved_file.is_file()):
        return
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    before = ModelConfig(**{k: v for k, v in json.loads(saved_file.read_text()).items() if k in fields})
    if _state_shapes(before) == _state_shapes(config):
        return
    old, new = (json.loads(json.dumps(dataclasses.asdict(c))) for c in (before, config))
    changed = ", ".join(f"{k} {old[k]!r} -> {new[k]!r}" for k in sorted(new) if old[k] != new[k])
    raise RecipeError(f"run {run_path} holds checkpoints of another model ({changed}): they cannot continue in "
                      "this one; pass --name to start a new run, or set those back")


def _state_shapes(config: ModelConfig) -> dict[str, tuple]:
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        return {name: tuple(t.shape) for name, t in ALBEF(config).state_dict().items()}


def check_no_stale_build_lock() -> None:
    locks = compat.stale_extension_locks()
    if locks:
        lock = locks[0]
        minutes = (time.time() - lock.stat().st_mtime) / 60
        raise RecipeError(f"{lock} is a build lock {minutes:.0f} minutes old, left by a build that was killed: "
                          f"every rank would wait on it forever. Remove it (rm {lock}) if no build is running")


def prepare_run(recipe: RunRecipe, resume: str, world_size: int) -> dict:
    """The checks every training app shares: fault limits, the DeepSpeed config (returned), a writable run
    directory, and checkpoints that agree with --resume."""
    check_limits(recipe)
    check_sampling_options(recipe.data.crop_scale, recipe.data.pairs, recipe.data.randaugment)
    check_no_stale_build_lock()
    ds_config = build_ds_config(recipe.dist.ds_config, recipe.schedule, world_size)
    check_writable(recipe.run_path)
    ckpt_dir = recipe.run_path / "checkpoints"
    if resume == "none" and (ckpt_dir / "latest").is_file():
        raise RecipeError(f"run {recipe.run_path} already has checkpoints: pass --resume auto to continue it, or "
                          "--name to start a new run")
    if resume == "auto":
        try:
            check_resumable(ckpt_dir)
        except CheckpointError as err:
            raise RecipeError(str(err)) from None
    return ds_config


# A tokenizer trained on the captions cuts few words and reads almost nothing as [UNK]; one trained on
# other text (the bundled synthetic one) cuts most real words into characters.
FIT_SAMPLE_CAPTIONS = 256
MAX_SPLIT_WORDS = 0.25
MAX_UNKNOWN_TOKENS = 0.01


def tokenizer_fit_warning(recipe: RunRecipe, tokenizer) -> str | None:
    """One line when the tokenizer does not fit the training captions (measured on the first few)."""
    captions = caption_sample(recipe.data.train, FIT_SAMPLE_CAPTIONS)
    fit = tokenizer_fit(tokenizer, captions)
    if fit.split_fraction <= MAX_SPLIT_WORDS and fit.unknown_fraction <= MAX_UNKNOWN_TOKENS:
        return None
    return (f"warning: the tokenizer {recipe.data.tokenizer} cuts {fit.split_fraction:.0%} of the words of "
            f"{len(captions)} training captions into pieces and reads {fit.unknown_fraction:.1%} of their tokens "
            f"as [UNK]: it was not trained on captions like these; train one on them (`make tokenizer "
            f"TOKENIZER_SHARDS={recipe.data.train} TOKENIZER_DIR=data/tokenizer-NAME`, which `make shards` does for "
            "a real source) and pass it with --data.tokenizer, or use --data.tokenizer bert-base-uncased")


def check_teacher_precision(config: ModelConfig, ds_config: dict, name: str) -> None:
    """A momentum teacher is held in the engine's weight dtype and has no fp32 master copy (no optimizer holds
    it): in bf16 or fp16 an EMA step of 1 - 0.995 is below the weights' resolution, and it would not follow."""
    half = [key for key in ("bf16", "fp16") if ds_config.get(key, {}).get("enabled")]
    if config.momentum_distillation and half:
        raise RecipeError(f"model.momentum_distillation needs fp32 weights but DeepSpeed config {name} enables "
                          f"{half[0]} (the teacher's EMA steps would round away): use an fp32 config such as "
                          "cpu_zero3.json, or turn momentum distillation off")


def check_limits(recipe: RunRecipe) -> None:
    """Sizes, counts and fault limits out of range: one line each, before anything divides by them."""
    at_least_1 = {"schedule.micro_batch_size": recipe.schedule.micro_batch_size,
                  "schedule.grad_accum": recipe.schedule.grad_accum, "schedule.max_steps": recipe.schedule.max_steps,
                  "logging.every": recipe.logging.every, "eval.batch_size": recipe.eval.batch_size,
                  "checkpoint.keep": recipe.checkpoint.keep}
    at_least_0 = {"schedule.warmup_steps": recipe.schedule.warmup_steps,
                  "schedule.exit_at_step": recipe.schedule.exit_at_step, "checkpoint.every": recipe.checkpoint.every,
                  "eval.every": recipe.eval.every, "optim.max_nonfinite_steps": recipe.optim.max_nonfinite_steps,
                  "dist.watchdog_minutes": recipe.dist.watchdog_minutes, "data.min_side": recipe.data.min_side}
    limits = {name: (value, value >= 1, "use 1 or more") for name, value in at_least_1.items()}
    limits |= {name: (value, value >= 0, "use 0 or more") for name, value in at_least_0.items()}
    limits |= {
        "data.max_bad_fraction": (recipe.data.max_bad_fraction, 0 <= recipe.data.max_bad_fraction <= 1,
                                  "use a fraction between 0 and 1"),
        "dist.timeout_minutes": (recipe.dist.timeout_minutes, recipe.dist.timeout_minutes > 0,
                                 "a hung collective must end: use minutes > 0"),
    }  # fmt: skip
    for name, (value, valid, fix) in limits.items():
        if not valid:
            raise RecipeError(f"{name} is {value}: {fix}")


def check_writable(run_path: Path) -> None:
    """The run directory takes files: found now, not at the first checkpoint hours in."""
    try:
        probe_writable(run_path)
    except OSError as err:
        raise RecipeError(f"the run directory {run_path} is not writable ({err.strerror}): fix its permissions "
                          "or choose another --logging.run_dir") from None
