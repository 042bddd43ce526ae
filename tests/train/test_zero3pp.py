"""ds_configs/zero3pp.json (ZeRO++): it loads through our DeepSpeed-config path with explicit values, and on CPU
DeepSpeed runs its hierarchical partitioning (hpZ) for real while refusing its quantisers (qwZ, qgZ).

The CPU job is 4 gloo ranks told they are 2 nodes of 2 (LOCAL_SIZE=2), the smallest layout in which hpZ keeps
a secondary copy per node and qgZ takes its cross-node path.
"""

import json
from pathlib import Path

import pytest
import torch

from pretrain.train.ds_config import DS_CONFIG_DIR, build_ds_config
from pretrain.train.recipe import ScheduleSection
from tests.helpers.ranks import run_on_ranks, start_deepspeed

# what DeepSpeed's CPU accelerator answers for its QuantizerBuilder (deepspeed/ops/op_builder/cpu/no_impl.py)
CPU_REFUSAL = "This op had not been implemented on CPU backend."


def test_zero3pp_config_is_explicit_and_deepspeed_reads_its_zeropp_fields():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    config = build_ds_config("zero3pp", ScheduleSection(micro_batch_size=8, grad_accum=2), world_size=16)
    zero = DeepSpeedZeroConfig(**config["zero_optimization"])
    assert (zero.stage, zero.zero_hpz_partition_size, zero.zero_quantized_weights, zero.zero_quantized_gradients) == (
        3, 8, True, True)  # fmt: skip
    assert config["bf16"] == {"enabled": True} and config["train_batch_size"] == 8 * 2 * 16
    plain = build_ds_config("zero3", ScheduleSection(micro_batch_size=8, grad_accum=2), world_size=16)
    added = {k: v for k, v in config["zero_optimization"].items() if plain["zero_optimization"].get(k) != v}
    assert added == {"zero_hpz_partition_size": 8, "zero_quantized_weights": True, "zero_quantized_gradients": True}


def test_an_hpz_size_that_does_not_divide_the_ranks_is_one_error_before_any_rank_starts():
    from pretrain.train.recipe import RecipeError

    with pytest.raises(RecipeError) as error:
        build_ds_config("zero3pp", ScheduleSection(), world_size=12)
    assert str(error.value) == (
        f"DeepSpeed config {DS_CONFIG_DIR / 'zero3pp.json'} sets zero_hpz_partition_size=8 (ZeRO++: GPUs per node) "
        "but the job has 12 ranks, not a multiple: set it to the ranks per node in a copy of the JSON"
    )


def _engine(config: dict):
    import deepspeed

    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Tanh(), torch.nn.Linear(48, 4))
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), config=config)
    return engine


def _steps(engine, rank: int) -> tuple[list[float], list[float]]:
    """Two steps on this rank's seeded batch: the losses, and the first weight gathered afterwards."""
    import deepspeed

    batch = torch.randn(4, 32, generator=torch.Generator().manual_seed(rank))
    losses = []
    for _ in range(2):
        loss = engine(batch).pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    weight = engine.module[0].weight
    with deepspeed.zero.GatheredParameters([weight]):
        return losses, weight.detach().flatten()[:64].tolist()


def _zeropp_on_cpu(rank: int, world: int, store: str) -> dict:


    torch.set_num_threads(1)
    start_deepspeed(rank, world, store, ranks_per_node=2)

    # 2 "nodes" of 2 ranks: hpZ set to the ranks per node in a copy of the JSON, as its error line says
    two_per_node = Path(f"{store}.zero3pp-rank{rank}.json")
    shipped = json.loads((DS_CONFIG_DIR / "zero3pp.json").read_text())
    shipped["zero_optimization"]["zero_hpz_partition_size"] = 2
    two_per_node.write_text(json.dumps(shipped))

    def config(**zero) -> dict:
        built = build_ds_config(str(two_per_node), ScheduleSection(micro_batch_size=4), world)
        built["bf16"]["enabled"] = False  # fp32: hpZ and plain ZeRO-3 must then agree exactly
        built["zero_optimization"] |= {"zero_quantized_weights": False, "zero_quantized_gradients": False, **zero}
        return built

    result = {}
    hierarchical = _engine(config())
    result["secondary_copies"] = all(p.ds_secondary_tensor is not None for p in hierarchical.module.parameters())
    result["hpz"] = _steps(hierarchical, rank)
    result["zero3"] = _steps(_engine(config(zero_hpz_partition_size=1)), rank)
    refusals = {}  # hpZ off: DeepSpeed makes its hpZ group once per process
    try:
        _steps(_engine(config(zero_hpz_partition_size=1, zero_quantized_gradients=True)), rank)  # first backward
    except ValueError as error:
        refusals["qgZ"] = str(error)
    try:
        _engine(config(zero_hpz_partition_size=1, zero_quantized_weights=True))  # refused when zero.Init starts
    except ValueError as error:
        refusals["qwZ"] = str(error)
    result["refusals"] = refusals
    return result


@pytest.mark.slow
def test_on_cpu_hpz_trains_like_zero3_and_the_quantisers_are_refused(tmp_path):
    results = run_on_ranks(_zeropp_on_cpu, store=tmp_path / "store", world=4, init_group=False)
    for rank, result in results.items():
        assert result["secondary_copies"], rank  # hpZ really partitioned a second time, within the "node"
        assert result["hpz"][0] == pytest.approx(result["zero3"][0], abs=1e-6)  # losses of both steps
        assert result["hpz"][1] == pytest.approx(result["zero3"][1], abs=1e-6)  # and the updated weights
        assert result["hpz"][1] == pytest.approx(results[0]["hpz"][1], abs=0)  # one model on every rank
        assert result["refusals"] == {"qgZ": CPU_REFUSAL, "qwZ": CPU_REFUSAL}
    assert results[0]["hpz"][0] != results[1]["hpz"][0]  # the ranks' batches differ: the gradients were reduced
