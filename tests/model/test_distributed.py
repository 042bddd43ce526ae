"""ALBEF's forward on 2 ranks over gloo equals 1 process on the whole batch: ITC against the gathered
features, ITM negatives drawn from the other rank (each rank alone shows a single image), MLM."""

import pytest
import torch

from pretrain.model import ALBEF
from tests.helpers.model import make_batch, tiny_config
from tests.helpers.ranks import average_over_ranks, run_on_ranks


def _batch() -> dict:
    # Rank 0 holds two copies of sample 0, rank 1 two copies of sample 1: any hard negative a rank can
    # draw lies on the other rank, and both candidates there are identical, so the draw is deterministic.
    base = make_batch(tiny_config(), batch_size=2)
    batch = {k: v[[0, 0, 1, 1]] for k, v in base.items() if k != "keys"}
    batch["image_ids"] = torch.tensor([0, 0, 1, 1])
    # Each rank averages MLM over its own masked tokens (as ALBEF): equal counts make that the global mean.
    masked = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    masked[:, 1:4] = True
    batch["mlm_input_ids"] = torch.where(masked, 4, batch["input_ids"])
    batch["mlm_labels"] = torch.where(masked, batch["input_ids"], -100)
    return batch


def _loss_and_grads(rows: slice) -> list[torch.Tensor]:
    """Losses and gradients in float64 (what is compared is the distribution of the work, not rounding)."""
    torch.manual_seed(0)
    model = ALBEF(tiny_config()).double()
    batch = {k: v[rows] for k, v in _batch().items()}
    batch["pixel_values"] = batch["pixel_values"].double()
    out = model(batch)
    out.loss.backward()
    return [torch.stack([out.loss, out.loss_itc, out.loss_itm, out.loss_mlm]).detach(),
            *(p.grad for p in model.parameters())]


def _on_rank(rank: int, world: int) -> list[torch.Tensor]:
    return average_over_ranks(_loss_and_grads(slice(2 * rank, 2 * rank + 2)))


@pytest.mark.slow
def test_albef_two_ranks_equal_one_process(tmp_path):
    results = run_on_ranks(_on_rank, store=tmp_path / "store")
    reference = _loss_and_grads(slice(0, 4))
    assert reference[0][2] > 0.1  # ITM saw real negatives
    for rank in (0, 1):
        for ours, expected in zip(results[rank], reference):
            torch.testing.assert_close(ours, expected, atol=1e-12, rtol=1e-10)
