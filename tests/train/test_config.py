"""Recipe loading, DeepSpeed config building and optimizer rules: the errors a user can cause."""

import dataclasses
import json
import os
import re
import time
from pathlib import Path

import pytest
import torch

from data_pipeline import DataError
from pretrain.model import ModelConfig
from pretrain.train.cli import parse_args
from pretrain.train.ds_config import DS_CONFIG_DIR, build_ds_config
from pretrain.train.optim import parameter_groups, warmup_cosine
from pretrain.train.preflight import prepare
from pretrain.train.recipe import Recipe, RecipeError, ScheduleSection, load_recipe, recipe_from_dict
from tests.helpers.jobs import recipe_flags


def exactly(message: str) -> str:
    """For pytest.raises(match=...): the whole message, not a part of it."""
    return f"^{re.escape(message)}$"


def test_shipped_recipes_load():
    tiny = load_recipe("tiny_synthetic")
    base = load_recipe("albef_base_coco_flickr")
    assert tiny.model.preset == "tiny" and tiny.dist.backend == "gloo" and tiny.model.patch_stem == "conv"
    assert base.model.preset == "base" and base.dist.ds_config.endswith("zero3.json")


def test_unknown_recipe_key_is_one_clear_error():
    with pytest.raises(RecipeError, match=exactly(
            "unknown recipe key 'optim.learning_rate': valid keys in 'optim' are ['betas', 'eps', 'lr', "
            "'max_nonfinite_steps', 'min_lr_ratio', 'weight_decay']")):
        recipe_from_dict({"optim": {"learning_rate": 1e-4}})
    with pytest.raises(RecipeError, match=exactly(
            "unknown recipe key 'optimizer': valid keys are ['checkpoint', 'data', 'dist', 'eval', 'logging', "
            "'model', 'name', 'optim', 'schedule', 'seed']")):
        recipe_from_dict({"optimizer": {}})


def test_wrong_type_is_rejected():
    with pytest.raises(RecipeError, match=exactly(
            "recipe key schedule.max_steps must be int, got 'many': fix the value in the recipe or on the command "
            "line")):
        recipe_from_dict({"schedule": {"max_steps": "many"}})


def test_cli_overrides_win_over_recipe():
    args = parse_args(["--recipe", "tiny_synthetic", "--optim.lr", "3e-4", "--data.crop_scale", "[0.3, 1.0]",
                       "--name", "x"])
    recipe = load_recipe(args.recipe, args)
    assert recipe.optim.lr == pytest.approx(3e-4)
    assert recipe.data.crop_scale == (0.3, 1.0)
    assert recipe.name == "x"


def test_help_documents_every_recipe_field(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    # one entry per option, from its flag to the next option's; compared without the wrapping's whitespace
    entries = {entry.split()[0]: "".join(entry.split()) for entry in re.split(r"\n  (?=--)", capsys.readouterr().out)}
    fields = {}  # every field of every section of the recipe, and its top-level fields, as the dataclasses say
    defaults = Recipe()
    for top in dataclasses.fields(Recipe):
        section = getattr(defaults, top.name)
        if dataclasses.is_dataclass(section):
            fields |= {f"--{top.name}.{f.name}": (f, getattr(section, f.name)) for f in dataclasses.fields(section)}
        else:
            fields[f"--{top.name}"] = (top, section)
    assert set(entries) - set(fields) == {"usage:", "--recipe", "--resume", "--validate-only"}  # and no other
    for flag, (field, default) in fields.items():
        assert "".join(f"{flag} VALUE {field.metadata['help']}".split()) in entries[flag], flag
        assert "".join(f"default: {default!r}]".split()) in entries[flag], flag


def test_ds_config_gets_batch_sizes_from_the_recipe():
    config = build_ds_config("zero3", ScheduleSection(micro_batch_size=8, grad_accum=4), world_size=16)
    assert config["train_micro_batch_size_per_gpu"] == 8
    assert config["gradient_accumulation_steps"] == 4
    assert config["train_batch_size"] == 512
    assert config["bf16"]["enabled"] is True and config["zero_optimization"]["stage"] == 3


def test_ds_config_contradiction_and_auto_are_errors(tmp_path):
    contradicting = tmp_path / "c.json"
    contradicting.write_text(json.dumps({"train_batch_size": 100}))
    with pytest.raises(RecipeError, match=exactly(
            f"DeepSpeed config {contradicting} sets train_batch_size=100 but the recipe gives 64 (micro_batch_size=32 "
            "x grad_accum=1 x world_size=2): delete it from the JSON; batch sizes live in the recipe")):
        build_ds_config(str(contradicting), ScheduleSection(micro_batch_size=32), world_size=2)
    auto = tmp_path / "a.json"
    auto.write_text(json.dumps({"bf16": {"enabled": "auto"}}))
    with pytest.raises(RecipeError, match=exactly(
            f'DeepSpeed config {auto} sets bf16.enabled to "auto", which plain DeepSpeed ignores (bf16 "auto" '
            'silently means fp32): write an explicit value')):
        build_ds_config(str(auto), ScheduleSection(), world_size=1)
    with pytest.raises(RecipeError, match=exactly(
            f"DeepSpeed config '{tmp_path / 'missing.json'}' not found: set dist.ds_config to a JSON path or one of "
            f"{sorted(path.name for path in DS_CONFIG_DIR.glob('*.json'))}")):
        build_ds_config(str(tmp_path / "missing.json"), ScheduleSection(), world_size=1)


def test_no_weight_decay_on_norms_biases_and_temperature():
    model = torch.nn.Module()
    model.proj = torch.nn.Linear(4, 4)
    model.norm = torch.nn.LayerNorm(4)
    model.temp = torch.nn.Parameter(torch.ones(1) * 0.07)
    decay, no_decay = parameter_groups(model, 0.05)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0


def test_warmup_then_cosine():
    factor = warmup_cosine(ScheduleSection(max_steps=110, warmup_steps=10), min_lr_ratio=0.1)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.55)  # halfway through the cosine: (1 + 0.1) / 2
    assert factor(110) == pytest.approx(0.1)


@pytest.fixture
def base_flags(synthetic_shards, tokenizer_dir, tmp_path):
    return recipe_flags(synthetic_shards, tokenizer_dir, tmp_path, val=True)


def prepare_error(flags: list[str], world_size: int = 2) -> str:
    with pytest.MonkeyPatch.context() as env, pytest.raises((RecipeError, DataError)) as err:
        env.setenv("WORLD_SIZE", str(world_size))
        prepare(parse_args(flags))
    message = str(err.value)
    assert "\n" not in message  # one line
    return message


def test_valid_setup_passes(base_flags, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    setup = prepare(parse_args(base_flags))
    assert setup.model_config.vocab_size == len(setup.tokenizer)
    assert setup.ds_config["train_batch_size"] == 2 * setup.recipe.schedule.micro_batch_size


def test_user_errors_are_caught_before_any_process_group(base_flags, tmp_path, tokenizer, monkeypatch):
    # the whole line, so that the sentence naming the fix is checked, not just an echo of the input
    nope, pattern, braces = tmp_path / "nope", tmp_path / "x-*.tar", tmp_path / "x-{000..003}.tar"
    assert prepare_error(base_flags + ["--data.train", str(nope)]) == (
        f"1 of 1 shards in '{nope}' are missing (e.g. {nope}); check the spec or rerun make_shards")
    assert prepare_error(base_flags + ["--data.train", str(pattern)]) == (
        f"shard pattern '{pattern}' matches no file; check the path")
    assert prepare_error(base_flags + ["--data.train", str(braces)]) == (
        f"4 of 4 shards in '{braces}' are missing (e.g. {tmp_path / 'x-000.tar'}); check the spec or rerun make_shards")
    assert prepare_error(base_flags + ["--model.overrides", "{vocab_size: 999}"]) == (
        f"the tokenizer has {len(tokenizer)} tokens but the model vocabulary has 999: use the tokenizer the model "
        "was trained with, or drop model.overrides.vocab_size")
    shipped = sorted(path.name for path in DS_CONFIG_DIR.glob("*.json"))
    assert prepare_error(base_flags + ["--dist.ds_config", "missing_config"]) == (
        f"DeepSpeed config 'missing_config' not found: set dist.ds_config to a JSON path or one of {shipped}")
    assert prepare_error(base_flags + ["--data.num_workers", "2"], world_size=4) == (
        "4 shards cannot feed 4 ranks x 2 workers in epoch mode; write at least that many shards (make shards "
        "MIN_SHARDS=8), use fewer workers, or mode='resampled'")
    with pytest.raises(SystemExit):  # argparse: an option that does not exist
        parse_args(base_flags + ["--optim.learning_rate", "1"])
    assert prepare_error(base_flags + ["--model.overrides", "{hiden: 3}"]) == (
        "model: unknown model config key(s) hiden; valid keys are "
        + ", ".join(sorted(f.name for f in dataclasses.fields(ModelConfig))))
    assert prepare_error(base_flags + ["--data.max_len", "33"]) == (
        "data.max_len 33 exceeds the model's 32 positions (preset 'tiny'): lower data.max_len or set "
        "model.overrides.max_position")
    monkeypatch.setenv("WORLD_SIZE", "2")
    longer = base_flags + ["--data.max_len", "40", "--model.overrides", "{max_position: 40}"]
    assert prepare(parse_args(longer)).model_config.max_position == 40


def two_rank_checkpoint(run_dir) -> Path:
    """A complete-looking step-4 checkpoint of 2 ranks (placeholder files): what preflight looks at."""
    ckpt = run_dir / "checkpoints"
    (ckpt / "step00000004").mkdir(parents=True)
    for rank in (0, 1):
        (ckpt / "step00000004" / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").write_bytes(b"x")
    (ckpt / "latest").write_text("step00000004")
    return ckpt


def test_a_fresh_start_over_existing_checkpoints_is_refused(base_flags, tmp_path, monkeypatch):
    ckpt = two_rank_checkpoint(tmp_path / "earlier")
    assert prepare_error(base_flags + ["--name", "earlier"]) == (
        f"run {ckpt.parent} already has checkpoints: pass --resume auto to continue it, or --name to start a new run")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert prepare(parse_args(base_flags + ["--name", "earlier", "--resume", "auto"])).recipe.run_path == ckpt.parent


def test_resuming_checkpoints_of_another_model_names_what_changed(base_flags, tmp_path, monkeypatch):
    ckpt = two_rank_checkpoint(tmp_path / "earlier")
    monkeypatch.setenv("WORLD_SIZE", "2")
    resume = base_flags + ["--name", "earlier", "--resume", "auto"]
    saved = prepare(parse_args(resume)).model_config  # the linear stem the test jobs pin
    # an older run's file lacks fields added since: they read as their defaults
    older = {k: v for k, v in dataclasses.asdict(saved).items() if k != "weight_itm"}
    (ckpt.parent / "model_config.json").write_text(json.dumps(older))
    assert prepare(parse_args(resume + ["--model.dropout", "0.1"])).model_config.dropout == 0.1  # same weights
    assert prepare_error(resume + ["--model.patch_stem", "conv"]) == (
        f"run {ckpt.parent} holds checkpoints of another model (patch_stem 'linear' -> 'conv'): they cannot continue "
        "in this one; pass --name to start a new run, or set those back")


def test_model_section_fields_reach_the_model_config_and_alpha_ramps_over_one_epoch(base_flags, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    flags = base_flags + ["--schedule.micro_batch_size", "8", "--model.fusion", "co_attention", "--model.dropout",
                          "0.1", "--model.momentum_distillation", "true", "--model.queue_size", "64",
                          "--model.itm_negative_hardness", "0.25", "--model.patch_stem", "conv",
                          "--model.caption_words_weight", "0.5"]
    config = prepare(parse_args(flags)).model_config
    assert (config.fusion, config.dropout, config.momentum_distillation, config.queue_size,
            config.itm_negative_hardness, config.patch_stem, config.weight_words) == (
        "co_attention", 0.1, True, 64, 0.25, "conv", 0.5)
    assert config.distill_alpha_ramp_steps == 3  # 40 training images / (8 per rank x 2 ranks), rounded up
    every_pair = prepare(parse_args(flags + ["--data.pairs", "every_caption"])).model_config
    assert every_pair.distill_alpha_ramp_steps == 13  # the epoch is 200 (image, caption) pairs: 5 per image
    assert config.momentum_every == 1  # one forward per optimizer update
    assert prepare(parse_args(flags + ["--schedule.grad_accum", "2"])).model_config.momentum_every == 2
    ramp = prepare(parse_args(flags + ["--model.overrides", "{distill_alpha_ramp_steps: 7}"])).model_config
    assert ramp.distill_alpha_ramp_steps == 7
    assert prepare(parse_args(base_flags)).model_config.distill_alpha_ramp_steps == 0  # no distillation
    assert prepare_error(base_flags + ["--model.queue_size", "64"]) == (
        "model: queue_size 64 needs momentum_distillation: the queue holds the momentum encoders' features; turn "
        "it on or set queue_size 0")
    assert prepare_error(base_flags + ["--model.patch_stem", "conv", "--model.vit", "google/vit-base-patch16-224"]) == (
        "model.vit loads a ViTModel's linear patch embedding, which patch_stem 'conv' does not have: set "
        "model.patch_stem linear")
    assert prepare_error(base_flags + ["--model.fusion", "merged"]) == (
        "model: fusion 'merged' is unknown; use one of cross_attention, co_attention")
    assert prepare_error(base_flags + ["--model.momentum_distillation", "true", "--dist.ds_config", "zero3"]) == (
        "model.momentum_distillation needs fp32 weights but DeepSpeed config zero3 enables bf16 (the teacher's EMA "
        "steps would round away): use an fp32 config such as cpu_zero3.json, or turn momentum distillation off")


def test_a_build_lock_left_by_a_killed_build_is_one_error_and_a_fresh_one_is_not(base_flags, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    lock = tmp_path / "extensions" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()  # a build running now: wait for it as torch does
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert prepare(parse_args(base_flags)).world_size == 2
    two_hours_ago = time.time() - 7200
    os.utime(lock, (two_hours_ago, two_hours_ago))
    assert prepare_error(base_flags) == (
        f"{lock} is a build lock 120 minutes old, left by a build that was killed: every rank would wait on it "
        f"forever. Remove it (rm {lock}) if no build is running")


def test_sampling_options_the_loader_cannot_use_are_one_error_before_any_rank_starts(base_flags):
    assert prepare_error(base_flags + ["--data.pairs", "every_image"]) == (
        "pairs 'every_image' is unknown; use one of random_caption, every_caption")
    assert prepare_error(base_flags + ["--data.randaugment", "[2, 12]"]) == (
        "randaugment (ops, magnitude) (2, 12) needs ops >= 0 and 0 <= magnitude <= 10")
    assert prepare_error(base_flags + ["--data.crop_scale", "[0.9, 0.5]"]) == (
        "crop_scale (0.9, 0.5) must satisfy 0 < low <= high <= 1; fix it")


def test_a_batch_of_0_is_one_error_before_the_epoch_length_divides_by_it(base_flags):
    assert prepare_error(base_flags + ["--schedule.micro_batch_size", "0"]) == (
        "schedule.micro_batch_size is 0: use 1 or more")
