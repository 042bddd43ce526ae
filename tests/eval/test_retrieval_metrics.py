"""Retrieval metric code on toy similarity matrices whose answers are worked out by hand."""

import pytest
import torch

from pretrain.eval.retrieval import recall_at_k


def test_perfect_scores_give_full_recall():
    image_ids = torch.tensor([10, 11, 12])
    text_image_ids = torch.tensor([10, 10, 11, 11, 12, 12])  # two captions per image
    scores = (image_ids[:, None] == text_image_ids[None, :]).float()
    metrics = recall_at_k(scores, image_ids, text_image_ids)
    assert metrics["i2t"] == {"r1": 1.0, "r5": 1.0, "r10": 1.0}
    assert metrics["t2i"] == {"r1": 1.0, "r5": 1.0, "r10": 1.0}


def test_hand_computed_ranks():
    # 3 images (ids 0,1,2), 4 texts with owners 0,0,1,2.
    image_ids = torch.tensor([0, 1, 2])
    text_image_ids = torch.tensor([0, 0, 1, 2])
    scores = torch.tensor([
        [0.1, 0.5, 0.9, 0.0],  # image 0: best own caption (0.5) ranks 2nd behind text 2 -> miss at R@1
        [0.2, 0.1, 0.8, 0.3],  # image 1: its caption (0.8) ranks 1st
        [0.9, 0.8, 0.7, 0.1],  # image 2: its caption ranks 4th (last)
    ])
    metrics = recall_at_k(scores, image_ids, text_image_ids, ks=(1, 2, 3))
    assert metrics["i2t"] == pytest.approx({"r1": 1 / 3, "r2": 2 / 3, "r3": 2 / 3})
    # text columns: t0 -> images scored [0.1,0.2,0.9]: own image 0 ranks 3rd; t1 [0.5,0.1,0.8]: 2nd;
    # t2 [0.9,0.8,0.7]: own image 1 ranks 2nd; t3 [0.0,0.3,0.1]: own image 2 ranks 2nd.
    assert metrics["t2i"] == {"r1": 0.0, "r2": 0.75, "r3": 1.0}


def test_ties_count_against_the_positive():
    image_ids = torch.tensor([0, 1])
    text_image_ids = torch.tensor([0, 1])
    scores = torch.zeros(2, 2)  # a constant model must not score R@1 = 1
    metrics = recall_at_k(scores, image_ids, text_image_ids, ks=(1, 2))
    assert metrics["i2t"]["r1"] == 0.0 and metrics["i2t"]["r2"] == 1.0
    assert metrics["t2i"]["r1"] == 0.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_query_row_is_a_miss(bad):
    # 3 images, one caption each, perfect scores except image 1's row: a broken model must not look perfect.
    ids = torch.tensor([0, 1, 2])
    scores = torch.eye(3)
    scores[1] = bad
    metrics = recall_at_k(scores, ids, ids, ks=(1, 2, 3))
    # image 1 ranks its caption last (3rd of 3, ties counting against it): found only at R@3
    assert metrics["i2t"] == pytest.approx({"r1": 2 / 3, "r2": 2 / 3, "r3": 1.0})
    # text 1's only positive (image 1) is non-finite: it ranks last, behind both finite negatives
    assert metrics["t2i"] == pytest.approx({"r1": 2 / 3, "r2": 2 / 3, "r3": 1.0})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_positive_ranks_below_finite_negatives(bad):
    ids = torch.tensor([0, 1, 2])
    scores = torch.tensor([[bad, 0.5, 0.2], [0.0, 0.9, 0.1], [0.0, 0.1, 0.9]])
    metrics = recall_at_k(scores, ids, ids, ks=(1, 2, 3))
    assert metrics["i2t"] == pytest.approx({"r1": 2 / 3, "r2": 2 / 3, "r3": 1.0})
    assert metrics["t2i"] == pytest.approx({"r1": 2 / 3, "r2": 2 / 3, "r3": 1.0})


def test_non_finite_scores_rank_below_every_finite_one():
    # one column of NaN: caption 0's score is NaN for every image
    ids = torch.tensor([0, 1])
    scores = torch.tensor([[float("nan"), -0.9], [float("nan"), 0.5]])
    metrics = recall_at_k(scores, ids, ids, ks=(1, 2))
    # image 0: its caption (NaN) ranks last behind caption 1 (-0.9, the lowest finite score); image 1: first
    assert metrics["i2t"] == {"r1": 0.5, "r2": 1.0}
    assert metrics["t2i"]["r1"] == 0.5  # text 0 has no finite score: a miss; text 1: image 1 (0.5 > -0.9)


def test_an_all_nan_matrix_has_zero_recall():
    ids = torch.arange(4)
    metrics = recall_at_k(torch.full((4, 4), float("nan")), ids, ids, ks=(1, 3))
    assert metrics["i2t"] == metrics["t2i"] == {"r1": 0.0, "r3": 0.0}
