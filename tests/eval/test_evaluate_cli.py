"""`python -m pretrain.evaluate` takes what the command line leaves out from the run directory's recipe.yaml,
and writes eval.json into the run directory (or the current one), never into the exported model."""

import argparse
import hashlib
import json
import shutil
from dataclasses import asdict

import pytest
import yaml

from data_pipeline import DataError, load_eval_data
from data_pipeline.train_tokenizer import train_tokenizer
from pretrain.eval.retrieval import evaluate_retrieval
from pretrain.evaluate import main, run_recipe, run_tokenizer
from pretrain.train.cli import parse_args
from pretrain.train.export import save_export
from pretrain.train.loop import write_run_files
from pretrain.train.preflight import prepare
from pretrain.train.recipe import load_recipe
from tests.eval.test_evaluate_retrieval import CPU, tiny_model
from tests.helpers.jobs import recipe_flags


def write_run(run_dir, **fields) -> None:
    """recipe.yaml as the training loop writes it, with `fields` ("data.val": ...) set."""
    recipe = load_recipe("tiny_synthetic", argparse.Namespace(**{k: str(v) for k, v in fields.items()}))
    run_dir.mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(asdict(recipe), sort_keys=False))


def digests(folder) -> dict:
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def run_dir(tmp_path, synthetic_shards, tokenizer, tokenizer_dir):
    run_dir = tmp_path / "runs" / "x"
    write_run(run_dir, **{"data.val": synthetic_shards["val"], "data.tokenizer": tokenizer_dir, "data.max_len": 16,
                          "eval.itm_rerank_k": 4, "eval.batch_size": 8})
    save_export(tiny_model(tokenizer), tokenizer, run_dir / "export")
    return run_dir


def test_an_export_in_a_run_is_evaluated_as_the_run_did_and_eval_json_goes_to_the_run(run_dir, synthetic_shards,
                                                                                        tokenizer, capsys):
    export = run_dir / "export"
    before = digests(export)
    assert main(["--checkpoint", str(export)]) == 0  # no --data, --tokenizer, --max-len, --itm-rerank-k
    assert f"wrote {run_dir / 'eval.json'}" in capsys.readouterr().out
    written = json.loads((run_dir / "eval.json").read_text())
    assert digests(export) == before  # the exported model folder is left as it was: no eval.json in it
    # the recipe's settings, not the built-in defaults (max_len 32, no re-ranking)
    data = load_eval_data(str(synthetic_shards["val"]), tokenizer, image_size=32, max_len=16)
    expected, _ = evaluate_retrieval(tiny_model(tokenizer), data, 8, 4, CPU)
    assert written["itm_rerank_k"] == 4 and written["num_texts"] == 60
    assert written["i2t"] == pytest.approx(expected["i2t"]) and written["t2i"] == pytest.approx(expected["t2i"])


def test_an_export_without_a_run_writes_eval_json_in_the_current_directory(run_dir, synthetic_shards, tmp_path,
                                                                           monkeypatch, capsys):
    export = tmp_path / "copied" / "export"  # an export copied out of its run: no recipe.yaml beside it
    shutil.copytree(run_dir / "export", export)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["--checkpoint", str(export)]) == 2
    assert capsys.readouterr().err == (f"error: no validation data: {export} has no recipe.yaml with data.val beside "
                                       "it; pass --data\n")
    assert main(["--checkpoint", str(export), "--data", str(synthetic_shards["val"])]) == 0
    assert json.loads((work / "eval.json").read_text())["itm_rerank_k"] == 0  # built-in default without a run
    assert sorted(p.name for p in export.parent.rglob("eval.json")) == []
    results = tmp_path / "results"  # --out a directory: eval.json in it
    results.mkdir()
    assert main(["--checkpoint", str(export), "--data", str(synthetic_shards["val"]), "--out", str(results)]) == 0
    assert json.loads((results / "eval.json").read_text()) == json.loads((work / "eval.json").read_text())


def test_a_checkpoints_directory_takes_the_tokenizer_the_run_trained_with(run_dir, tokenizer):
    checkpoints = run_dir / "checkpoints"  # DeepSpeed's folder holds no tokenizer: recipe.yaml names it
    checkpoints.mkdir()
    found = run_tokenizer(checkpoints, None, run_recipe(checkpoints))
    assert found.get_vocab() == tokenizer.get_vocab()
    given = run_tokenizer(checkpoints, str(run_dir / "export" / "tokenizer"), run_recipe(checkpoints))
    assert given.name_or_path == str(run_dir / "export" / "tokenizer")  # --tokenizer wins


def test_relative_paths_of_the_recipe_are_found_from_where_the_run_started(tmp_path, synthetic_shards, tokenizer,
                                                                          tokenizer_dir, monkeypatch, capsys):
    project = tmp_path / "project"  # trained there with `--data.tokenizer tok --data.val shards/val`
    shutil.copytree(tokenizer_dir, project / "tok")
    shutil.copytree(synthetic_shards["val"], project / "shards" / "val")
    run_dir = project / "runs" / "x"
    write_run(run_dir, **{"data.val": "shards/val", "data.tokenizer": "tok", "logging.run_dir": "runs", "name": "x"})
    checkpoints = run_dir / "checkpoints"
    checkpoints.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert run_tokenizer(checkpoints, None, run_recipe(checkpoints)).get_vocab() == tokenizer.get_vocab()
    save_export(tiny_model(tokenizer), tokenizer, run_dir / "export")
    capsys.readouterr()
    assert main(["--checkpoint", str(run_dir / "export")]) == 0, capsys.readouterr().err  # data.val found too
    assert json.loads((run_dir / "eval.json").read_text())["num_images"] == 12


def test_a_run_tokenizer_that_does_not_load_names_the_recipe_and_the_fix(tmp_path, synthetic_shards):
    run_dir = tmp_path / "runs" / "y"
    missing = tmp_path / "tokenizer-gone"  # an absolute path: no Hub look-up (a Hub-style name waits for retries)
    write_run(run_dir, **{"data.val": synthetic_shards["val"], "data.tokenizer": missing})
    checkpoints = run_dir / "checkpoints"
    with pytest.raises(DataError) as raised:
        run_tokenizer(checkpoints, None, run_recipe(checkpoints))
    assert str(raised.value) == (
        f"the tokenizer '{missing}' that {run_dir / 'recipe.yaml'} names does not load (OSError) from here or from "
        "where the run started: pass --tokenizer")


def test_a_tokenizer_of_another_size_is_one_error(tokenizer, tmp_path, capsys):
    model = tiny_model(tokenizer)
    small = tmp_path / "small"
    train_tokenizer(iter(["a red circle", "a blue square"] * 3), str(small), vocab_size=40, min_frequency=1)
    save_export(model, tokenizer, tmp_path / "export")
    capsys.readouterr()
    assert main(["--checkpoint", str(tmp_path / "export"), "--tokenizer", str(small), "--data", "unused"]) == 2
    assert capsys.readouterr().err == (
        f"error: the tokenizer has 40 tokens but the model's vocabulary has {len(tokenizer)}: pass --tokenizer "
        "with the one the model was trained with\n")


def test_the_run_keeps_the_tokenizer_it_trained_with_and_evaluate_prefers_it(synthetic_shards, tokenizer,
                                                                             tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    setup = prepare(parse_args(recipe_flags(synthetic_shards, tokenizer_dir, tmp_path / "runs")))
    write_run_files(setup)
    run_dir = setup.recipe.run_path
    # the recipe's tokenizer folder is remade afterwards (make shards / make tokenizer again): other ids
    remade = tmp_path / "remade"
    train_tokenizer(iter(["a red circle", "a blue square"] * 3), str(remade), vocab_size=40, min_frequency=1)
    recipe = run_recipe(run_dir / "checkpoints")
    recipe.data.tokenizer = str(remade)  # as if data.tokenizer's folder now held the remade one
    found = run_tokenizer(run_dir / "checkpoints", None, recipe)
    assert found.get_vocab() == tokenizer.get_vocab()  # the run's own copy, not the remade folder
