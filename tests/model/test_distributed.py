"""ALBEF's forward on 2 ranks over gloo equals 1 process on the whole batch: ITC against the gathered
features, ITM negatives drawn from the other rank (each rank alone shows a single image), MLM."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain.model import ALBEF
from tests.helpers.model import make_batch, tiny_config


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


def _loss_and_grads(rows: slice) -> tuple[torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = ALBEF(tiny_config())
    out = model({k: v[rows] for k, v in _batch().items()})
    out.loss.backward()
    return torch.stack([out.loss, out.loss_itc, out.loss_itm, out.loss_mlm]).detach(), [
        p.grad for p in model.parameters()
    ]


def _worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        losses, grads = _loss_and_grads(slice(2 * rank, 2 * rank + 2))
        for t in [losses, *grads]:  # what a data-parallel engine does
            dist.all_reduce(t)
            t /= 2
        out[rank] = (losses, grads)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_albef_two_ranks_equal_one_process():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(port, out), nprocs=2, join=True)
        results = dict(out)
    losses, grads = _loss_and_grads(slice(0, 4))
    assert losses[2] > 0.1  # ITM saw real negatives
    for rank in (0, 1):
        rank_losses, rank_grads = results[rank]
        torch.testing.assert_close(rank_losses, losses, atol=1e-5, rtol=1e-4)
        for ours, reference in zip(rank_grads, grads):
            torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-3)
