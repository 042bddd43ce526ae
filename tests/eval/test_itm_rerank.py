"""ITM re-ranking with a toy model whose ITC similarities and ITM logits are tables chosen by hand."""

import pytest
import torch
from torch import nn

from pretrain.eval.retrieval import evaluate_retrieval, format_table

CPU = torch.device("cpu")


class TableModel(nn.Module):
    """Image i and text t score sim[i, t] under ITC and itm[i, t] (two logits, index 1 = match) under ITM.

    The "embeddings" carry the row index, so itm_logits can look its pair up.
    """

    def __init__(self, sim: torch.Tensor, itm: torch.Tensor):
        super().__init__()
        self.register_buffer("sim", sim)
        self.register_buffer("itm", itm)

    def encode_image(self, pixel_values: torch.Tensor):
        index = pixel_values[:, 0].long()
        return index[:, None, None].float(), torch.eye(self.sim.shape[0])[index]  # one-hot: feats @ text = sim

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        index = input_ids[:, 0]
        return index[:, None, None].float(), self.sim[:, index].T

    def itm_logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, attention_mask: torch.Tensor):
        images = image_embeds[:, 0, 0].long().repeat_interleave(len(text_embeds) // len(image_embeds))
        return self.itm[images, text_embeds[:, 0, 0].long()]


class IndexData:
    """Eval data stand-in for one process: image i's pixels and text t's tokens are just their indices."""

    def __init__(self, text_image_ids: list[int], num_images: int):
        self.image_ids = torch.arange(num_images)
        self.text_image_ids = torch.tensor(text_image_ids)

    def image_batches(self, batch_size: int, rank: int = 0, world_size: int = 1):
        for rows in torch.arange(len(self.image_ids)).split(batch_size):
            yield {"pixel_values": rows[:, None].float(), "image_ids": self.image_ids[rows]}

    def text_batches(self, batch_size: int, rank: int = 0, world_size: int = 1):
        for rows in torch.arange(len(self.text_image_ids)).split(batch_size):
            yield {"input_ids": rows[:, None], "attention_mask": torch.ones(len(rows), 1, dtype=torch.long),
                   "image_ids": self.text_image_ids[rows]}


def margins_to_logits(margin: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.zeros_like(margin), margin], dim=-1)


def test_near_certain_matches_rank_in_logit_order():
    # 12 images, caption t belongs to image t. ITC ranks each positive 3rd, behind two near neighbours in both
    # directions; ITM gives all three margins of 20..22 (match probabilities 1 - 2e-9 .. 1 - 3e-10, equal in fp32)
    # and the positive the largest.
    n = 12
    sim, margin = torch.zeros(n, n), torch.zeros(n, n)
    for i in range(n):
        sim[i, i], sim[i, (i + 1) % n], sim[i, (i + 2) % n] = 0.5, 0.9, 0.8
        margin[i, i], margin[i, (i + 1) % n], margin[i, (i + 2) % n] = 22.0, 21.0, 20.0
    probs = margins_to_logits(margin).softmax(-1)[..., 1]
    assert probs[0, 0] == probs[0, 1] == probs[0, 2]  # the scenario: fp32 probabilities cannot tell them apart
    model = TableModel(sim, margins_to_logits(margin))
    metrics, _ = evaluate_retrieval(model, IndexData(list(range(n)), n), 5, 3, CPU)
    assert metrics["i2t"] == metrics["t2i"] == {"r1": 1.0, "r5": 1.0, "r10": 1.0}


def reference_rank(itc: list[float], margins: list[float], positive: int, k: int) -> int:
    """0-based rank of the positive: the ITC top k first, by ITM margin; then the rest by ITC; ties against it."""
    top = set(sorted(range(len(itc)), key=lambda c: -itc[c])[:k])
    key = [(1, margins[c]) if c in top else (0, itc[c]) for c in range(len(itc))]
    return sum(key[c] >= key[positive] for c in range(len(itc)) if c != positive)


def test_reranking_orders_the_top_k_by_itm_and_keeps_the_rest_in_itc_order():
    # 12 images, one caption each (caption t of image t); the top k = 8 are re-ranked. Image queries:
    #  0-4  positive 8th by ITC (last of the top 8) with the largest margin     -> 1st after re-ranking
    #  5-7  positive 1st by ITC with the smallest margin of its top 8           -> 8th
    #  8-11 positive 9th by ITC (not re-ranked); the top 8 have margins ~ -40 -> stays 9th, inside R@10
    #       (a re-ranked candidate is above every other one however low its margin; the rest keep ITC order)
    n, k = 12, 8
    g = torch.Generator().manual_seed(0)
    sim, margin = torch.zeros(n, n), torch.zeros(n, n)
    for i in range(n):
        negatives = [t for t in torch.randperm(n, generator=g).tolist() if t != i]
        positive_at = 7 if i < 5 else 0 if i < 8 else 8
        order = negatives[:positive_at] + [i] + negatives[positive_at:]
        for rank, t in enumerate(order):
            sim[i, t] = 0.9 - 0.05 * rank
        for rank, t in enumerate(order[:k]):
            margin[i, t] = -40.0 - rank if i >= 8 else rank - 4.0
        margin[i, i] = 50.0 if i >= 8 else 5.0 if i < 5 else -5.0
    model = TableModel(sim, margins_to_logits(margin))
    data = IndexData(list(range(n)), n)
    reranked, _ = evaluate_retrieval(model, data, 5, k, CPU)
    itc_only, _ = evaluate_retrieval(model, data, 5, 0, CPU)
    assert reranked["i2t"] == pytest.approx({"r1": 5 / 12, "r5": 5 / 12, "r10": 1.0})
    assert itc_only["i2t"] == pytest.approx({"r1": 3 / 12, "r5": 3 / 12, "r10": 1.0})  # what a no-op would give
    # text queries: the same tables read by column, checked against the rule written out plainly
    t2i_ranks = [reference_rank(sim[:, t].tolist(), margin[:, t].tolist(), t, k) for t in range(n)]
    expected = {f"r{r}": sum(rank < r for rank in t2i_ranks) / n for r in (1, 5, 10)}
    assert reranked["t2i"] == pytest.approx(expected)
    assert reranked["t2i"] != itc_only["t2i"]
    # the picture's examples list the candidates in that same order
    examples = evaluate_retrieval(model, data, 5, k, CPU)[1]
    for q, image in enumerate(examples.image_queries.tolist()):
        expected = reference_order(sim[image].tolist(), margin[image].tolist(), k)[:5]
        assert examples.texts_of_images[q].tolist() == expected, image


def reference_order(itc: list[float], margins: list[float], k: int) -> list[int]:
    top = sorted(range(len(itc)), key=lambda c: -itc[c])[:k]
    return sorted(top, key=lambda c: -margins[c]) + sorted(set(range(len(itc))) - set(top), key=lambda c: -itc[c])


def test_a_nan_similarity_takes_no_re_ranking_slot():
    # Caption 2's feature is NaN (so is its whole column). Image 0's ITC: its caption 0.5, caption 1 0.9; with
    # k = 2 the slots go to captions 1 and 0 (torch's topk alone would hand one to the NaN, leaving caption 0
    # behind caption 1), and ITM puts caption 0 first. Image 1 likewise finds caption 1; image 2's caption is NaN.
    sim = torch.tensor([[0.5, 0.9, 0.0], [0.1, 0.8, 0.0], [0.1, 0.2, 0.0]])
    sim[:, 2] = float("nan")
    margin = torch.zeros(3, 3)
    margin[0, 1] = 1.0
    margin[torch.arange(3), torch.arange(3)] = 3.0
    metrics, _ = evaluate_retrieval(TableModel(sim, margins_to_logits(margin)), IndexData([0, 1, 2], 3), 4, 2, CPU)
    assert metrics["i2t"]["r1"] == pytest.approx(2 / 3)
    assert metrics["non_finite_queries"] == {"i2t": 3, "t2i": 1}  # every image row holds the NaN; one caption


def test_itm_accuracy_on_held_out_hard_triples_and_both_tables():
    """6 images, caption t of image t; ITC ranks caption i+1 first among image i's negatives (so image j-1 first for
    caption j). ITM says match for pairs (0..3, same) and for (0, 1): 4 of 6 positives right, and the pair (0, 1)
    is wrong both as image 0's hard caption and as caption 1's hard image: (4 + 5 + 5) / 18."""
    n = 6
    sim, margin = torch.eye(n) * 0.5, torch.full((n, n), -3.0)
    for i in range(n):
        sim[i, (i + 1) % n] = 0.9
    margin[range(4), range(4)] = 3.0
    margin[0, 1] = 3.0
    metrics, _ = evaluate_retrieval(TableModel(sim, margins_to_logits(margin)), IndexData(list(range(n)), n), 4, 2, CPU)
    assert metrics["itm_accuracy"] == pytest.approx(14 / 18)
    assert metrics["itc"] == {"i2t": {"r1": 0.0, "r5": 1.0, "r10": 1.0}, "t2i": {"r1": 0.0, "r5": 1.0, "r10": 1.0}}
    # re-ranked top 2: captions 0, 2, 3 find their image; 1 ties with image 0, 4 and 5 tie at -3 (ties count against)
    assert metrics["t2i"]["r1"] == 0.5
    table = format_table(metrics).splitlines()
    assert [line.split()[:4] for line in table[2:6]] == [
        ["image->text", "ITC", "0.000", "1.000"], ["text->image", "ITC", "0.000", "1.000"],
        ["image->text", "ITC", "+", "ITM"], ["text->image", "ITC", "+", "ITM"]]
    assert table[5].split()[-3:] == ["0.500", "1.000", "1.000"]
    assert table[-1] == "ITM accuracy on held-out hard triples 0.778 (always 'no match': 0.667)"
    itc_only, _ = evaluate_retrieval(TableModel(sim, margins_to_logits(margin)), IndexData(list(range(n)), n), 4, 0,
                                     CPU)
    assert "itc" not in itc_only and "itm_accuracy" not in itc_only and len(format_table(itc_only).splitlines()) == 4
