"""python -m pretrain.generate: one image, a shard set to JSONL + instruct_eval.json, and bad images."""

import io
import json

import pytest
import torch
from PIL import Image

from data_pipeline.make_instructions import main as make_instructions
from data_pipeline.sources.vqa import normalise_answer
from pretrain.generate import main as generate
from pretrain.generate import shard_metrics
from pretrain.model.multimodal_lm import MultimodalLM
from tests.helpers.multimodal import write_export, write_lm


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    torch.manual_seed(0)
    model = MultimodalLM.build(write_export(root / "export"), str(write_lm(root / "lm")), image_tokens=4)
    model.save_pretrained(root / "saved")
    return root / "saved"


def test_one_image_and_a_broken_one(saved, tmp_path, capsys):
    image = tmp_path / "scene.jpg"
    buffer = io.BytesIO()
    Image.new("RGB", (80, 80), (200, 30, 30)).save(buffer, format="JPEG")
    image.write_bytes(buffer.getvalue())
    args = ["--checkpoint", str(saved), "--image", str(image), "--max-new-tokens", "5"]
    assert generate(args) == 0 and generate(args) == 0
    first, second = capsys.readouterr().out.strip().splitlines()[-2:]
    assert first == second  # greedy
    image.write_bytes(buffer.getvalue()[:40])
    assert generate(args) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"error: cannot decode image {image} (truncated_image)")


def test_a_shard_set_gives_one_answer_per_sample_caption_metrics_and_vqa_accuracy(saved, synthetic_shards,
                                                                                  vqa_shards, tmp_path):
    make_instructions(["--captions", str(synthetic_shards["train"].parent), "--vqa", str(vqa_shards["val"].parent),
                       "--out", str(tmp_path / "set"), "--splits", "val", "--quiet", "--min-shards", "2"])
    out = tmp_path / "new" / "answers.jsonl"  # a directory that does not exist yet
    args = ["--checkpoint", str(saved), "--data", str(tmp_path / "set" / "val"), "--out", str(out),
            "--max-new-tokens", "4", "--batch-size", "5", "--limit", "7", "--num-beams", "2"]
    assert generate(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    captions, questions = ([r for r in rows if r["task"] == task] for task in ("caption", "vqa"))
    assert len(captions) == len(questions) == 7 and len({r["key"] for r in rows}) == 14  # --limit: 7 per task
    assert all(len(r["references"]) == 5 for r in captions) and all(r["prompt"].startswith("<image>\n") for r in rows)
    assert all(r["prompt"].endswith("?") and r["reference"] for r in questions)  # the question itself
    metrics = json.loads((tmp_path / "new" / "instruct_eval.json").read_text())
    held_out = [r["held_out"] for r in captions]  # training and held-out phrasings are scored apart
    assert metrics["samples"] == 14 and 0 < held_out.count(True) < 7
    assert metrics["captioning"]["captions"] == held_out.count(False)
    assert metrics["captioning_held_out_phrasings"]["captions"] == held_out.count(True)
    assert 0 <= metrics["captioning"]["bleu4"] <= 1
    vqa = metrics["vqa"]
    assert vqa["questions"] == 7 and sum(t["questions"] for t in vqa["per_type"].values()) == 7
    right = sum(normalise_answer(r["answer"]) == r["reference"] for r in questions)
    assert vqa["accuracy"] == pytest.approx(right / 7)  # an untrained model: most likely 0


def test_each_phrasing_is_grounded_apart_and_counts_its_yes_no_answers():
    scene = "A large red circle at the top on a white background."
    def row(key, prompt, answer, held_out):
        return {"key": key, "task": "caption", "prompt": f"<image>\n{prompt}", "answer": answer,
                "references": [scene], "held_out": held_out}
    rows = [row("a", "Caption this image.", "A small red circle on a white background.", False),
            row("b", "Caption this image.", "A blue circle on a white background.", False),
            row("c", "Describe the scene.", "yes", True), row("d", "Describe the scene.", "No.", True),
            row("e", "Describe the scene.", scene, True)]
    by_phrasing = shard_metrics(rows, {})["captioning_by_phrasing"]
    assert list(by_phrasing) == ["Caption this image.", "Describe the scene."]
    seen, unseen = by_phrasing.values()
    assert (seen["held_out"], seen["captions"], seen["yes_no"]) == (False, 2, 0)
    assert (unseen["held_out"], unseen["captions"], unseen["yes_no"]) == (True, 3, 2)
    assert (seen["color_match"], seen["background_match"]) == pytest.approx((0.5, 1.0))
    assert (unseen["color_match"], unseen["background_match"]) == pytest.approx((1 / 3, 1 / 3))
