"""evaluate_retrieval and `python -m pretrain.evaluate` end to end on the tiny synthetic val set (12 images)."""

import dataclasses

import pytest
import torch

from data_pipeline import load_eval_data
from pretrain.eval.retrieval import evaluate_retrieval
from pretrain.model import ALBEF
from tests.helpers.model import tiny_config

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def eval_data(synthetic_shards, tokenizer):
    return load_eval_data(str(synthetic_shards["val"]), tokenizer, image_size=32, max_len=32)


def tiny_model(tokenizer, seed: int = 0) -> ALBEF:
    torch.manual_seed(seed)  # ALBEF's init draws from the global generator
    config = dataclasses.replace(tiny_config(image_size=32), vocab_size=len(tokenizer))
    return ALBEF(config)


def nan_model(tokenizer) -> ALBEF:
    model = tiny_model(tokenizer)
    with torch.no_grad():
        model.vision_proj.weight.fill_(float("nan"))
    return model


@pytest.mark.parametrize("itm_rerank_k", [0, 4])
def test_a_nan_model_scores_zero_recall_and_counts_every_query(eval_data, tokenizer, itm_rerank_k):
    metrics, _ = evaluate_retrieval(nan_model(tokenizer), eval_data, 5, itm_rerank_k, CPU)
    zero = {"r1": 0.0, "r5": 0.0, "r10": 0.0}
    assert metrics["i2t"] == zero and metrics["t2i"] == zero
    assert metrics["non_finite_queries"] == {"i2t": 12, "t2i": 60}


def test_a_finite_model_reports_no_non_finite_query(eval_data, tokenizer):
    metrics, _ = evaluate_retrieval(tiny_model(tokenizer), eval_data, 5, 4, CPU)
    assert metrics["non_finite_queries"] == {"i2t": 0, "t2i": 0}


def test_the_cli_warns_about_a_nan_model_and_prints_no_perfect_table(synthetic_shards, tokenizer, tmp_path, capsys):
    from pretrain.evaluate import main
    from pretrain.train.export import save_export

    save_export(nan_model(tokenizer), tokenizer, tmp_path / "export")
    out = tmp_path / "eval.json"
    assert main(["--checkpoint", str(tmp_path / "export"), "--data", str(synthetic_shards["val"]),
                 "--batch-size", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    warnings = [line for line in printed.err.splitlines() if "non-finite" in line]
    assert len(warnings) == 1
    assert "12 of 12 image queries" in warnings[0] and "60 of 60 text queries" in warnings[0]
    table = [line.split() for line in printed.out.splitlines() if line.startswith(("image->text", "text->image"))]
    assert [row[1:] for row in table] == [["ITC"] + ["0.000"] * 3] * 2
