"""The export reads checkpoints saved without ZeRO (stage 0) as well as with it: real DeepSpeed engines on 2
gloo ranks take one AdamW step and save through our `save_checkpoint`; the exported weights must be the
trained ones exactly. ZeRO-3's export is held by the end-to-end runs (tests/train/test_e2e.py)."""

from pathlib import Path

import pytest
import torch

from pretrain.model import ALBEF, model_preset
from pretrain.train.export import model_from_zero_checkpoint
from tests.helpers.ranks import run_on_ranks, start_deepspeed

pytestmark = pytest.mark.slow
STAGES = (0, 2)
CONFIG = model_preset("tiny", vocab_size=64)


def _train_and_save(rank: int, world: int, store: str, out: str) -> None:
    import deepspeed

    from pretrain.train.checkpoint import rng_state, save_checkpoint

    torch.set_num_threads(1)
    start_deepspeed(rank, world, store)
    for stage in STAGES:
        torch.manual_seed(0)
        model = ALBEF(CONFIG)
        config = {"train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
                  "zero_optimization": {"stage": stage}}
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.01),
                                          config=config)
        flat = torch.cat([p.flatten() for p in engine.module.parameters()])
        # a loss every parameter feels, different on each rank: the step averages two gradients
        shift = torch.randn(flat.numel(), generator=torch.Generator().manual_seed(rank))
        engine.backward((flat * shift).sum())
        engine.step()
        save_checkpoint(engine, Path(out) / f"stage{stage}", step=1, rank_state={"rng": rng_state()}, keep=1)
        if rank == 0:
            trained = {name: value.clone() for name, value in engine.module.state_dict().items()}
            torch.save(trained, Path(out) / f"trained{stage}.pt")


def test_the_export_reads_checkpoints_without_zero_and_with_zero_2(tmp_path):
    run_on_ranks(_train_and_save, str(tmp_path), store=tmp_path / "store", init_group=False)
    torch.manual_seed(0)
    initial = ALBEF(CONFIG)
    for stage in STAGES:
        trained = torch.load(tmp_path / f"trained{stage}.pt", weights_only=True)
        exported = model_from_zero_checkpoint(tmp_path / f"stage{stage}", CONFIG).state_dict()
        assert exported.keys() == trained.keys()
        for name, value in trained.items():
            assert torch.equal(exported[name], value), (stage, name)
        for name, value in initial.named_parameters():  # the checkpoint is of the step, not of the start
            assert not torch.equal(value, trained[name]), (stage, name)
