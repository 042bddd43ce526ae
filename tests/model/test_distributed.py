"""ALBEF's forward on 2 ranks over gloo equals 1 process on the whole batch: ITC against the gathered
features, ITM negatives drawn from the other rank (each rank alone shows a single image), and MLM as the
mean of each rank's own mean (ALBEF's), which the masked counts below tell apart from a global mean."""

import pytest
import torch

from pretrain.model import ALBEF
from tests.helpers.model import make_batch, tiny_config
from tests.helpers.ranks import average_over_ranks, run_on_ranks

RANK_ROWS = (slice(0, 2), slice(2, 4))
MASKED_PER_CAPTION = (1, 4)  # rank 0 masks 1 token per caption, rank 1 four: 2 and 8 masked tokens


def _batch() -> dict:
    # Rank 0 holds two copies of sample 0, rank 1 two copies of sample 1: any hard negative a rank can
    # draw lies on the other rank, and both candidates there are identical, so the draw is deterministic.
    base = make_batch(tiny_config(), batch_size=2)
    batch = {k: v[[0, 0, 1, 1]] for k, v in base.items() if k != "keys"}
    batch["image_ids"] = torch.tensor([0, 0, 1, 1])
    masked = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    for rows, count in zip(RANK_ROWS, MASKED_PER_CAPTION):
        masked[rows, 1 : 1 + count] = True
    assert (masked <= batch["attention_mask"].bool()).all()  # real tokens only
    batch["mlm_input_ids"] = torch.where(masked, 4, batch["input_ids"])
    batch["mlm_labels"] = torch.where(masked, batch["input_ids"], -100)
    return batch


def _model_and_batch(rows: slice) -> tuple[ALBEF, dict]:
    """The model and batch in float64 (what is compared is the distribution of the work, not rounding)."""
    torch.manual_seed(0)
    model = ALBEF(tiny_config()).double()
    batch = {k: v[rows] for k, v in _batch().items()}
    batch["pixel_values"] = batch["pixel_values"].double()
    return model, batch


def _results(model: ALBEF, losses: list[torch.Tensor]) -> list[torch.Tensor]:
    """[total, itc, itm, mlm] and the gradients of the total."""
    losses[0].backward()
    return [torch.stack(losses).detach(), *(p.grad for p in model.parameters())]


def _on_rank(rank: int, world: int) -> list[torch.Tensor]:
    model, batch = _model_and_batch(RANK_ROWS[rank])
    torch.manual_seed(0)  # the ITM draws (deterministic here whatever the seed, see _batch)
    out = model(batch)
    return average_over_ranks(_results(model, [out.loss, out.loss_itc, out.loss_itm, out.loss_mlm]))


def _one_process() -> tuple[list[torch.Tensor], list[float]]:
    """One process on the whole batch with MLM as the mean of the two ranks' means, and those means. Each
    rank's mean comes from the whole batch with the other rank's labels dropped (a caption's MLM depends
    on its own image and text only)."""
    model, batch = _model_and_batch(slice(0, 4))
    outs = []
    for rows in RANK_ROWS:
        labels = torch.full_like(batch["mlm_labels"], -100)
        labels[rows] = batch["mlm_labels"][rows]
        torch.manual_seed(0)
        outs.append(model({**batch, "mlm_labels": labels}))
    mlm = (outs[0].loss_mlm + outs[1].loss_mlm) / 2
    results = _results(model, [outs[0].loss_itc + outs[0].loss_itm + mlm, outs[0].loss_itc, outs[0].loss_itm, mlm])
    return results, [out.loss_mlm.item() for out in outs]


@pytest.mark.slow
def test_albef_two_ranks_equal_one_process_with_mlm_averaged_per_rank(tmp_path):
    results = run_on_ranks(_on_rank, store=tmp_path / "store")
    reference, rank_means = _one_process()
    assert reference[0][2] > 0.1  # ITM saw real negatives
    # The mean over all 10 masked tokens would weigh rank 1's mean 8:2; the mean of the means weighs 1:1.
    counts = [2 * n for n in MASKED_PER_CAPTION]
    global_mean = sum(m * n for m, n in zip(rank_means, counts)) / sum(counts)
    margin = abs(sum(rank_means) / 2 - global_mean)
    print(f"MLM per rank {rank_means}; mean of means - global mean = {margin:.3g}")
    assert margin > 1e-3  # 1e7 times the tolerance below: a global mean fails
    for rank in (0, 1):
        for ours, expected in zip(results[rank], reference):
            torch.testing.assert_close(ours, expected, atol=1e-12, rtol=1e-10)
