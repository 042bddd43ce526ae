"""Two real ranks over gloo, two DataLoader workers each: lockstep batches, every sample once per epoch."""

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from data_pipeline import check_shards, load_tokenizer, make_train_loader
from tests.helpers.ranks import run_on_ranks


def run_rank(rank: int, world: int, store: str, shards: str, tokenizer_dir: str) -> list[dict]:
    torch.set_num_threads(1)  # two ranks and their workers share the CI machine's cores
    # the trainer's order: check the data before any process group exists
    check_shards(shards, world_size=world, num_workers=2)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    loader = make_train_loader(
        shards, load_tokenizer(tokenizer_dir), batch_size=5, rank=rank, world_size=world, num_workers=2,
        seed=3, image_size=32, max_len=24,
    )  # fmt: skip
    epochs = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        keys, steps = [], 0
        for batch in loader:
            steps += 1
            total = torch.tensor([batch["pixel_values"].shape[0]])
            dist.all_reduce(total)  # a collective per step, as ZeRO-3 does: unequal batch counts would hang
            keys += batch["keys"]
        epochs.append({"steps": steps, "keys": keys, "len": len(loader)})
    return epochs


@pytest.mark.slow
def test_two_gloo_ranks_stay_in_lockstep_and_cover_the_epoch(synthetic_shards, tokenizer_dir, tmp_path):
    results = run_on_ranks(run_rank, str(synthetic_shards["train"]), str(tokenizer_dir), store=tmp_path / "store",
                           init_group=False)
    all_keys = set()
    for epoch in range(2):
        ranks = [results[0][epoch], results[1][epoch]]
        assert ranks[0]["steps"] == ranks[1]["steps"] == ranks[0]["len"] == 4
        keys = ranks[0]["keys"] + ranks[1]["keys"]
        assert len(keys) == len(set(keys)) == 40
        all_keys |= set(keys)
    assert len(all_keys) == 40
    assert results[0][0]["keys"] != results[0][1]["keys"]
