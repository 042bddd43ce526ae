"""Recipe loading, DeepSpeed config building and optimizer rules: the errors a user can cause."""

import json

import pytest
import torch

from data_pipeline import DataError
from pretrain.train.cli import parse_args
from pretrain.train.ds_config import build_ds_config
from pretrain.train.optim import parameter_groups, warmup_cosine
from pretrain.train.preflight import prepare
from pretrain.train.recipe import RecipeError, ScheduleSection, load_recipe, recipe_from_dict


def test_shipped_recipes_load():
    tiny = load_recipe("tiny_synthetic")
    base = load_recipe("albef_base_coco_flickr")
    assert tiny.model.preset == "tiny" and tiny.dist.backend == "gloo"
    assert base.model.preset == "base" and base.dist.ds_config.endswith("zero3.json")


def test_unknown_recipe_key_is_one_clear_error():
    with pytest.raises(RecipeError, match=r"unknown recipe key 'optim.learning_rate'.*'lr'"):
        recipe_from_dict({"optim": {"learning_rate": 1e-4}})
    with pytest.raises(RecipeError, match="unknown recipe key 'optimizer'"):
        recipe_from_dict({"optimizer": {}})


def test_wrong_type_is_rejected():
    with pytest.raises(RecipeError, match="schedule.max_steps"):
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
    text = capsys.readouterr().out
    for flag in ("--optim.lr", "--schedule.grad_accum", "--data.train", "--eval.itm_rerank_k", "--dist.ds_config"):
        assert flag in text


def test_ds_config_gets_batch_sizes_from_the_recipe():
    config = build_ds_config("zero3", ScheduleSection(micro_batch_size=8, grad_accum=4), world_size=16)
    assert config["train_micro_batch_size_per_gpu"] == 8
    assert config["gradient_accumulation_steps"] == 4
    assert config["train_batch_size"] == 512
    assert config["bf16"]["enabled"] is True and config["zero_optimization"]["stage"] == 3


def test_ds_config_contradiction_and_auto_are_errors(tmp_path):
    contradicting = tmp_path / "c.json"
    contradicting.write_text(json.dumps({"train_batch_size": 100}))
    with pytest.raises(RecipeError, match="train_batch_size=100 but the recipe gives 64"):
        build_ds_config(str(contradicting), ScheduleSection(micro_batch_size=32), world_size=2)
    auto = tmp_path / "a.json"
    auto.write_text(json.dumps({"bf16": {"enabled": "auto"}}))
    with pytest.raises(RecipeError, match="bf16.enabled"):
        build_ds_config(str(auto), ScheduleSection(), world_size=1)
    with pytest.raises(RecipeError, match="not found"):
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
    return ["--recipe", "tiny_synthetic", "--data.train", str(synthetic_shards["train"]),
            "--data.val", str(synthetic_shards["val"]), "--data.tokenizer", str(tokenizer_dir),
            "--logging.run_dir", str(tmp_path)]  # fmt: skip


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


def test_user_errors_are_caught_before_any_process_group(base_flags, tmp_path, monkeypatch):
    assert "nope" in prepare_error(base_flags + ["--data.train", str(tmp_path / "nope")])
    assert "matches no file" in prepare_error(base_flags + ["--data.train", str(tmp_path / "x-*.tar")])
    assert "missing" in prepare_error(base_flags + ["--data.train", str(tmp_path / "x-{000..003}.tar")])
    assert "vocabulary" in prepare_error(base_flags + ["--model.overrides", "{vocab_size: 999}"])
    assert "not found" in prepare_error(base_flags + ["--dist.ds_config", "missing_config"])
    # 4 train shards cannot feed 4 ranks x 2 workers in epoch mode
    assert "shards" in prepare_error(base_flags + ["--data.num_workers", "2"], world_size=4)
    with pytest.raises(SystemExit):  # argparse: an option that does not exist
        parse_args(base_flags + ["--optim.learning_rate", "1"])
    assert "unknown model config key" in prepare_error(base_flags + ["--model.overrides", "{hiden: 3}"])
    assert prepare_error(base_flags + ["--data.max_len", "33"]) == (
        "data.max_len 33 exceeds the model's 32 positions (preset 'tiny'): lower data.max_len or set "
        "model.overrides.max_position")
    monkeypatch.setenv("WORLD_SIZE", "2")
    longer = base_flags + ["--data.max_len", "40", "--model.overrides", "{max_position: 40}"]
    assert prepare(parse_args(longer)).model_config.max_position == 40
