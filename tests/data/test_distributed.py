"""Two real ranks over gloo, two DataLoader workers each: lockstep batches, every sample once per epoch."""

import json
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from data_pipeline import check_shards, load_tokenizer, make_train_loader


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_rank(rank: int, port: int, shards: str, tokenizer_dir: str, out: str) -> None:
    torch.set_num_threads(1)  # two ranks and their workers share the CI machine's cores
    # the trainer's order: check the data before any process group exists
    check_shards(shards, world_size=2, num_workers=2)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    loader = make_train_loader(
        shards, load_tokenizer(tokenizer_dir), batch_size=5, rank=rank, world_size=2, num_workers=2,
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
        gathered = [None, None]
        dist.all_gather_object(gathered, {"steps": steps, "keys": keys, "len": len(loader)})
        epochs.append(gathered)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(epochs, f)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_stay_in_lockstep_and_cover_the_epoch(synthetic_shards, tokenizer_dir, tmp_path):
    out = tmp_path / "result.json"
    args = (free_port(), str(synthetic_shards["train"]), str(tokenizer_dir), str(out))
    mp.start_processes(run_rank, args=args, nprocs=2, start_method="spawn", join=True)
    epochs = json.loads(out.read_text())
    all_keys = set()
    for ranks in epochs:
        assert ranks[0]["steps"] == ranks[1]["steps"] == ranks[0]["len"] == 4
        keys = ranks[0]["keys"] + ranks[1]["keys"]
        assert len(keys) == len(set(keys)) == 40
        all_keys |= set(keys)
    assert len(all_keys) == 40
    assert epochs[0][0]["keys"] != epochs[1][0]["keys"]
