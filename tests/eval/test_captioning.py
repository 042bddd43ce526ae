"""Caption metrics: the wrapper gives pycocoevalcap's own numbers on cleaned text, and the scene-word match."""

import contextlib
import io

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from pretrain.eval.captioning import caption_scores

REFERENCES = {
    "a": ["A large red circle in the top left.", "There is a big red circle at the top left."],
    "b": ["Two small blue squares on a gray background.", "A gray picture with two small blue squares."],
    "c": ["One green triangle in the middle.", "A green triangle, in the middle of the picture."],
}


def test_caption_scores_agree_with_the_maintained_package_on_a_toy_case():
    predictions = {"a": "A large red circle in the top left!", "b": "Two blue squares on gray.",
                   "c": "A purple triangle in the middle."}
    scores = caption_scores(predictions, REFERENCES)
    gts = {"a": ["a large red circle in the top left", "there is a big red circle at the top left"],
           "b": ["two small blue squares on a gray background", "a gray picture with two small blue squares"],
           "c": ["one green triangle in the middle", "a green triangle in the middle of the picture"]}
    res = {"a": ["a large red circle in the top left"], "b": ["two blue squares on gray"],
           "c": ["a purple triangle in the middle"]}
    with contextlib.redirect_stdout(io.StringIO()):
        bleu, _ = Bleu(4).compute_score(gts, res)
        cider, _ = Cider().compute_score(gts, res)
    assert scores["bleu4"] == pytest.approx(bleu[3]) and scores["cider"] == pytest.approx(cider)
    assert 0.3 < scores["bleu4"] < 1 and scores["cider"] > 0.5
    assert scores["scene_match"] == pytest.approx(2 / 3)  # "purple" where the scene is green


def test_a_reference_caption_scores_bleu_1_and_more_cider_than_a_wrong_one():
    perfect = caption_scores({k: v[0] for k, v in REFERENCES.items()}, REFERENCES)
    wrong = caption_scores({"a": "Two blue squares.", "b": "A red circle.", "c": "A red circle."}, REFERENCES)
    assert perfect["bleu4"] == pytest.approx(1.0) and perfect["scene_match"] == 1.0
    assert perfect["cider"] > wrong["cider"] and wrong["scene_match"] == 0.0


def test_grounding_parts_each_compare_one_thing_the_caption_says_of_the_scene():
    scene = "A large red circle in the top left and a small blue square at the bottom on a white background."
    predictions = {
        "all": "A small red circle in the top left and a small blue square on the left on a white background.",
        "none": "A large green circle on a black background.",
        "no_background": "A large blue circle in the center and a red square at the top on a gray background.",
    }
    scores = caption_scores(predictions, dict.fromkeys(predictions, [scene]))
    assert {k: scores[f"{k}_match"] for k in ("scene", "shape", "color", "background", "count")} == pytest.approx(
        {"scene": 2 / 3, "shape": 2 / 3, "color": 2 / 3, "background": 1 / 3, "count": 2 / 3})
