"""ITC with word-swapped hard-negative captions (NegCLIP): extra image-to-text columns without target mass."""

import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.model import ALBEF
from pretrain.model.objectives import HardNegatives, QueuedFeatures, itc_distill_loss, itc_loss
from tests.helpers.model import make_batch, tiny_config
from tests.helpers.ranks import average_over_ranks, run_on_ranks


def _features(rows: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(rows, 8, generator=g, dtype=torch.float64), dim=-1) for _ in range(3)]


def test_itc_with_hard_negatives_equals_a_hand_computation():
    image, text, swapped = _features(4)
    ids, valid, temperature = [5, 5, 6, 7], [True, False, True, True], 0.1
    result = itc_loss(image, text, torch.tensor(ids), torch.tensor([temperature], dtype=torch.float64),
                      HardNegatives(swapped, torch.tensor(valid)))

    def dot(a: torch.Tensor, b: torch.Tensor) -> float:
        return sum(x * y for x, y in zip(a.tolist(), b.tolist())) / temperature

    def row_loss(logits: list[float], targets: list[float]) -> float:
        lse = math.log(sum(math.exp(v) for v in logits))
        return -sum(t * (v - lse) for v, t in zip(logits, targets))

    i2t = t2i = 0.0
    for i in range(4):
        targets = [1 / ids.count(ids[i]) if ids[j] == ids[i] else 0.0 for j in range(4)]
        negatives = [dot(image[i], swapped[k]) for k in range(4) if valid[k]]
        i2t += row_loss([dot(image[i], text[j]) for j in range(4)] + negatives, targets) / 4
        t2i += row_loss([dot(text[i], image[j]) for j in range(4)], targets) / 4
    assert result.loss.item() == pytest.approx((i2t + t2i) / 2, rel=1e-12)
    assert result.sim_i2t.shape == (4, 4)  # the batch's captions only: what ITM draws from
    plain = itc_loss(image, text, torch.tensor(ids), torch.tensor([temperature], dtype=torch.float64))
    assert result.loss.item() > plain.loss.item() + 0.01  # the negatives took part


def test_itc_with_no_valid_hard_negative_is_plain_itc():
    image, text, swapped = _features(5, seed=1)
    ids, temperature = torch.tensor([0, 1, 1, 2, 3]), torch.tensor([0.07], dtype=torch.float64, requires_grad=True)
    plain = itc_loss(image, text, ids, temperature)
    none = itc_loss(image, text, ids, temperature, HardNegatives(swapped, torch.zeros(5, dtype=torch.bool)))
    for ours, expected in zip(none, plain):
        torch.testing.assert_close(ours, expected, rtol=1e-14, atol=0)
    (grad_plain,) = torch.autograd.grad(plain.loss, temperature)
    (grad_none,) = torch.autograd.grad(none.loss, temperature)
    torch.testing.assert_close(grad_none, grad_plain, rtol=1e-14, atol=0)


def _itc_case(rank: int, world: int) -> list[torch.Tensor]:
    """Projections of fixed inputs in float64 (hard negatives through the text projection, as in the model);
    the loss and gradients averaged over ranks as a data-parallel engine does."""
    g = torch.Generator().manual_seed(0)
    images, texts, swapped = (torch.randn(8, 6, generator=g, dtype=torch.float64) for _ in range(3))
    image_proj, text_proj = torch.nn.Linear(6, 4).double(), torch.nn.Linear(6, 4).double()
    for p in [*image_proj.parameters(), *text_proj.parameters()]:
        torch.nn.init.normal_(p, generator=g)
    temperature = torch.nn.Parameter(torch.tensor([0.1], dtype=torch.float64))
    valid = torch.tensor([True, False, True, True, False, True, True, True])
    rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
    negatives = HardNegatives(F.normalize(text_proj(swapped[rows]), dim=-1), valid[rows])
    loss = itc_loss(F.normalize(image_proj(images[rows]), dim=-1), F.normalize(text_proj(texts[rows]), dim=-1),
                    torch.arange(8)[rows], temperature, negatives).loss
    loss.backward()
    results = [loss.detach(), *(p.grad for p in [*image_proj.parameters(), *text_proj.parameters(), temperature])]
    return average_over_ranks(results) if world > 1 else results


@pytest.mark.slow
def test_itc_with_hard_negatives_on_two_ranks_equals_one_process(tmp_path):
    # each rank's images see the other rank's hard negatives too, and their gradients go back to it
    results = run_on_ranks(_itc_case, store=tmp_path / "store")
    reference = _itc_case(0, 1)
    for rank in (0, 1):
        for ours, expected in zip(results[rank], reference):
            torch.testing.assert_close(ours, expected, atol=1e-12, rtol=1e-12)


def _albef_losses(batch: dict) -> torch.Tensor:
    torch.manual_seed(0)
    model = ALBEF(tiny_config()).double()
    out = model({**batch, "pixel_values": batch["pixel_values"].double()})
    return torch.stack([out.loss_itc, out.loss_itm, out.loss_mlm])


def test_albef_uses_the_batch_swap_fields_in_itc_only():
    batch = make_batch(tiny_config(), batch_size=4)
    swapped = batch["input_ids"].clone()
    swapped[:, 2] = (swapped[:, 2] + 1) % tiny_config().vocab_size  # one token changed, padding kept
    swapped = swapped * batch["attention_mask"]
    fields = {"swap_input_ids": swapped, "swap_attention_mask": batch["attention_mask"]}
    plain = _albef_losses(batch)
    invalid = _albef_losses({**batch, **fields, "swap_valid": torch.zeros(4, dtype=torch.bool)})
    valid = _albef_losses({**batch, **fields, "swap_valid": torch.ones(4, dtype=torch.bool)})
    torch.testing.assert_close(invalid, plain, rtol=1e-10, atol=0)
    assert valid[0] > plain[0] + 0.01  # the hard negatives entered ITC
    torch.testing.assert_close(valid[1:], plain[1:], rtol=1e-10, atol=0)  # ITM and MLM untouched (same draws)


def test_distilled_itc_with_hard_negatives_equals_a_hand_computation():
    image, text, swapped = _features(3, seed=2)
    teacher_image, teacher_text, _ = _features(3, seed=3)
    ids, valid, temperature, alpha = [4, 5, 6], [True, False, True], 0.1, 0.4
    queue = QueuedFeatures(*_features(2, seed=4)[:2], torch.tensor([4, -1]))  # one filled slot, one empty
    result = itc_distill_loss(image, text, torch.tensor(ids), torch.tensor([temperature], dtype=torch.float64),
                              teacher_image, teacher_text, queue, alpha, HardNegatives(swapped, torch.tensor(valid)))

    def dot(a: torch.Tensor, b: torch.Tensor) -> float:
        return sum(x * y for x, y in zip(a.tolist(), b.tolist())) / temperature

    def softmax(values: list[float]) -> list[float]:
        total = sum(math.exp(v) for v in values)
        return [math.exp(v) / total for v in values]

    key_ids = ids + [4]  # the batch's keys, then the queue's filled slot
    text_keys, image_keys = [*teacher_text, queue.text_feat[0]], [*teacher_image, queue.image_feat[0]]
    i2t = t2i = 0.0
    for i in range(3):
        truth = [1 / key_ids.count(ids[i]) if k == ids[i] else 0.0 for k in key_ids]
        for own, keys, teacher, extra in ((image[i], text_keys, teacher_image[i], swapped), (text[i], image_keys,
                                                                                             teacher_text[i], None)):
            targets = [alpha * p + (1 - alpha) * t for p, t in zip(softmax([dot(teacher, k) for k in keys]), truth)]
            logits = [dot(own, k) for k in keys]
            negatives = [] if extra is None else [dot(own, extra[k]) for k in range(3) if valid[k]]
            lse = math.log(sum(math.exp(v) for v in logits + negatives))
            row = -sum(t * (v - lse) for v, t in zip(logits, targets)) / 3
            i2t, t2i = (i2t + row, t2i) if extra is not None else (i2t, t2i + row)
    assert result.loss.item() == pytest.approx((i2t + t2i) / 2, rel=1e-12)
    assert result.sim_i2t.shape == (3, 3)  # the batch's keys only
    plain = itc_distill_loss(image, text, torch.tensor(ids), torch.tensor([temperature], dtype=torch.float64),
                             teacher_image, teacher_text, queue, alpha)
    assert result.loss.item() > plain.loss.item() + 0.01  # the negatives took part
