"""fetch_rows (ITM hard negatives by all-to-all of indices and rows) against today's way, gathering every
rank's rows with gradient and indexing them: the same rows and gradients, and the same ALBEF ITM loss and
parameter gradients on 2 ranks."""

import pytest
import torch

import pretrain.model.albef as albef_module
from pretrain.distributed import fetch_rows, gather_with_grad
from pretrain.model import ALBEF
from tests.helpers.model import make_batch, tiny_config
from tests.helpers.ranks import run_on_ranks

ROWS = 5


def _gathered_then_indexed(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return gather_with_grad(x)[indices]


def _rows_and_gradient(rank: int, world: int, fetch) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(ROWS, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    # repeated indices, every rank asking for a different number of rows from each owner (some for none)
    indices = torch.randint(0, ROWS * world, (7 + rank,), generator=g)
    if rank == 0:
        indices = indices[indices >= ROWS] if world > 2 else indices  # asks nothing of itself
    weights = torch.randn(len(indices), 3, 4, generator=g, dtype=torch.float64)
    rows = fetch(x, indices)
    (rows * weights).sum().backward()
    mask = fetch(torch.arange(ROWS * 2).view(ROWS, 2) + 100 * rank, indices)  # integers, no gradient
    return [rows.detach(), x.grad, mask]


def _both_ways(rank: int, world: int) -> tuple[list, list]:
    return _rows_and_gradient(rank, world, fetch_rows), _rows_and_gradient(rank, world, _gathered_then_indexed)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_fetch_rows_equals_gathering_then_indexing(tmp_path, world):
    results = run_on_ranks(_both_ways, store=tmp_path / "store", world=world)
    for rank in range(world):
        fetched, gathered = results[rank]
        assert fetched[0].shape[0] > 0 and fetched[1].abs().sum() > 0
        (rows, grad, mask), (rows_today, grad_today, mask_today) = fetched, gathered
        assert torch.equal(rows, rows_today) and torch.equal(mask, mask_today)  # moved, not computed
        torch.testing.assert_close(grad, grad_today, rtol=1e-12, atol=1e-12)  # sums in another order


def _albef_itm(rank: int, world: int) -> tuple[list, list]:
    """ITM loss, total loss and every parameter's gradient, with fetch_rows and with today's gather."""
    results = []
    for fetch in (fetch_rows, _gathered_then_indexed):
        albef_module.fetch_rows = fetch
        torch.manual_seed(0)
        model = ALBEF(tiny_config()).double()
        batch = make_batch(tiny_config(), batch_size=4, seed=rank)
        batch = {k: v for k, v in batch.items() if k != "keys"}
        batch["pixel_values"] = batch["pixel_values"].double()
        batch["image_ids"] = batch["image_ids"] + 100 * rank  # every image differs across ranks
        torch.manual_seed(1 + rank)  # the same ITM draws both ways
        out = model(batch)
        out.loss.backward()
        results.append([out.loss_itm.detach(), out.loss.detach(), *(p.grad for p in model.parameters())])
    albef_module.fetch_rows = fetch_rows
    return results[0], results[1]


@pytest.mark.slow
def test_albef_itm_loss_and_gradients_equal_todays_on_two_ranks(tmp_path):
    results = run_on_ranks(_albef_itm, store=tmp_path / "store")
    for rank in (0, 1):
        fetched, gathered = results[rank]
        assert fetched[0] > 0.1  # ITM saw negatives
        assert len(fetched) == len(gathered) > 100
        for ours, today in zip(fetched, gathered):
            torch.testing.assert_close(ours, today, rtol=1e-12, atol=1e-12)
