"""Generative VQA scoring (exact match per question type against the majority-answer baseline) and the example
page of a generative evaluation."""

import pytest
import torch

from pretrain.eval.answers import answer_is_right, vqa_exact_match
from pretrain.eval.picture import BAR, HIT, MISS, PAD, THUMB, TITLE, answers_picture


def vqa_row(kind: str, answer: str, reference: str) -> dict:
    return {"task": "vqa", "question_type": kind, "answer": answer, "reference": reference,
            "prompt": "<image>\nwhat color is the circle?"}


def test_exact_match_per_type_against_the_majority_answer():
    rows = [vqa_row("color", "Red.", "red"), vqa_row("color", "blue", "red"), vqa_row("color", "the blue", "blue"),
            vqa_row("count", "2", "1"), vqa_row("count", "2", "2")]
    scores = vqa_exact_match(rows)
    assert scores["per_type"]["color"] == {"questions": 3, "accuracy": pytest.approx(2 / 3), "majority_answer": "red",
                                           "majority_baseline": pytest.approx(2 / 3)}
    assert scores["per_type"]["count"]["accuracy"] == 0.5 and scores["per_type"]["count"]["majority_baseline"] == 0.5
    assert scores["questions"] == 5 and scores["accuracy"] == pytest.approx(0.6)
    assert scores["majority_baseline"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="no VQA answer"):
        vqa_exact_match([])


def test_the_example_page_marks_right_and_wrong_answers():
    caption = {"task": "caption", "prompt": "<image>\nCaption this image.", "answer": "A red circle on white.",
               "references": ["A large red circle in the center on a white background."]}
    wrong = {**caption, "answer": "A blue square on white."}
    black, white = torch.zeros(3, 32, 32, dtype=torch.uint8), torch.full((3, 32, 32), 255, dtype=torch.uint8)
    examples = [(caption, black), (wrong, black), (vqa_row("color", "Red", "red"), white)]
    assert [answer_is_right(row) for row, _ in examples] == [True, False, True]
    page = answers_picture(examples)
    assert page.dtype == torch.uint8 and page.shape[0] == 3
    row_height = (page.shape[1] - TITLE) // 3
    bar_x = 2 * PAD + THUMB + BAR // 2
    colours = [tuple(page[:, TITLE + n * row_height + THUMB // 2, bar_x].tolist()) for n in range(3)]
    assert colours == [HIT, MISS, HIT]
    assert page[:, TITLE + 2 * row_height + THUMB // 2, PAD + THUMB // 2].tolist() == [255, 255, 255]  # the image
