"""Elastic resume: one run continued on 2, then 1, then 3 ranks (real `bash launch/pretrain.sh` jobs, ZeRO-3
over gloo) through DeepSpeed's universal checkpoint, on the session's 40-sample synthetic set."""

import re
from pathlib import Path

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from tests.helpers.jobs import PORT, TINY_JOB, check, logged_rows, recipe_flags, run

pytestmark = pytest.mark.slow
INJECTOR = str(Path(__file__).parent / "fault_injection")
BATCH = TINY_JOB["schedule.micro_batch_size"]


def saved_rank_states(ckpt_dir: Path, step: int) -> list[dict]:
    states = torch.load(ckpt_dir / f"step{step:08d}" / "zero_pp_rank_0_mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=False)
    return states["rank_states"]


def universal_tensor(ckpt_dir: Path, step: int, name: str, key: str) -> torch.Tensor:
    path = ckpt_dir / f"step{step:08d}" / "universal" / "zero" / name / f"{key}.pt"
    return torch.load(path, map_location="cpu", weights_only=True)  # ZeRO-3: the full tensor alone


def test_a_run_continues_on_2_then_1_then_3_ranks(synthetic_shards, tokenizer_dir, tmp_path):
    run_dir = tmp_path / "tiny-synthetic"
    ckpt_dir = run_dir / "checkpoints"

    def job(ranks: int, exit_at: int):
        loaded = tmp_path / f"loaded-{ranks}.pt"
        flags = recipe_flags(synthetic_shards, tokenizer_dir, tmp_path, TINY_JOB,
                             {"checkpoint.every": 0, "schedule.exit_at_step": exit_at})
        proc = check(run(["bash", "launch/pretrain.sh", *flags, "--resume", "auto"], timeout=400,
                         env={"GPUS_PER_NODE": str(ranks), "MASTER_PORT": PORT, "PYTHONPATH": INJECTOR,
                              "VLPRETRAIN_LOADED": str(loaded)}))
        return proc.stdout + proc.stderr, loaded

    # 2 ranks x 8 samples: epoch 0 is 2 steps (32 of 40 samples), step 3 reads 16 samples of epoch 1
    job(2, exit_at=3)
    assert [s["loader"]["samples_consumed"] for s in saved_rank_states(ckpt_dir, 3)] == [BATCH, BATCH]

    # 1 rank: 16 samples of epoch 1 are 2 batches (exact), then steps 4 and 5 read 2 more
    out, loaded = job(1, exit_at=5)
    assert "resuming step 3, saved by 2 ranks, on 1: weights and optimizer from its universal checkpoint; " \
           "data at epoch 1, sample 16 of the epoch (saved: 16)" in out
    (state,) = [s["loader"] for s in saved_rank_states(ckpt_dir, 5)]
    assert (state["epoch"], state["batches_consumed"], state["world_size"]) == (1, 4, 1)
    weights = torch.load(loaded, weights_only=False)
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag="step00000003")
    assert len(weights) > 50 and set(weights) <= set(consolidated)  # which also holds the tied MLM decoder
    for name, tensors in weights.items():
        for key, value in tensors.items():  # exactly what ds_to_universal wrote
            assert torch.equal(value, universal_tensor(ckpt_dir, 3, name, key).view_as(value)), (name, key)
        assert torch.equal(tensors["fp32"], consolidated[name].view_as(tensors["fp32"])), name  # the 2-rank run's
        assert tensors["exp_avg_sq"].abs().sum() > 0, name  # moments after 3 steps, not a fresh optimizer

    # 3 ranks: an epoch is 1 step of 24 samples; 32 of epoch 1's 40 read: rounded down to 24, which ends it
    out, loaded = job(3, exit_at=8)
    assert "resuming step 5, saved by 1 ranks, on 3: weights and optimizer from its universal checkpoint; " \
           "data at epoch 2, sample 0 of the epoch (saved: 32)" in out
    weights = torch.load(loaded, weights_only=False)
    for name, tensors in weights.items():
        for key, value in tensors.items():
            assert torch.equal(value, universal_tensor(ckpt_dir, 5, name, key).view_as(value)), (name, key)
    states = [s["loader"] for s in saved_rank_states(ckpt_dir, 8)]
    assert [(s["epoch"], s["batches_consumed"], s["rank"]) for s in states] == [(5, 0, r) for r in range(3)]
    assert re.search(r"done at step 8", out)
    rows = [row for row in logged_rows(run_dir) if "loss/total" in row]
    assert [row["step"] for row in rows] == list(range(1, 9))  # each step once, across three jobs
    assert all(torch.isfinite(torch.tensor(row["loss/total"])) for row in rows)
