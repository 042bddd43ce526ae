"""Fine-tuning on the real engine: DeepSpeed ZeRO-3 (and ZeRO-2) on 2 CPU ranks over gloo.

- in one 2-rank process group, each PEFT method trains 2 steps; the frozen base, gathered from its partitions,
  still has the base export's digest; the same under ZeRO-2, where nothing is partitioned;
- jobs launched as users launch them (ENTRY=finetune bash launch/pretrain.sh): LoRA for 4 steps, and the same
  stopped at step 2 and resumed: same losses, same saved weights; the saved adapter on the base export
  reproduces the run's VQA accuracy; checkpoints hold no base weight; the same job on two "nodes" of one rank each
  (`NO_SSH=1 NODE_RANK=0/1`) trains like the one-node job;
- bad input is one `error:` line before any rank starts.
"""

import json
import re
from pathlib import Path

import deepspeed
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from data_pipeline.vqa import VQATargets, load_vqa_eval
from pretrain.batch import to_device
from pretrain.eval.vqa import evaluate_vqa
from pretrain.finetune.base import open_base, weights_digest
from pretrain.finetune.cli import parse_args
from pretrain.finetune.preflight import prepare
from pretrain.finetune.recipe import FinetuneRecipe
from pretrain.finetune.saved import export_merged, load_finetuned
from pretrain.model import ALBEF, model_preset
from pretrain.train.ds_config import DS_CONFIG_DIR
from pretrain.train.engine import build_engine
from pretrain.train.loop import train_step
from pretrain.train.recipe import RecipeError
from pretrain.train.reliability.watchdog import Watchdog
from tests.helpers.jobs import PORT, check, losses, run, run_together
from tests.helpers.ranks import run_on_ranks, start_deepspeed

pytestmark = pytest.mark.slow
JOB = {"schedule.max_steps": 4, "schedule.warmup_steps": 1, "schedule.micro_batch_size": 8, "logging.every": 1,
       "checkpoint.every": 2, "eval.batch_size": 16, "data.max_len": 16, "optim.lr": "1e-2",
       "dist.ds_config": "ds_configs/cpu_zero3.json"}


def flags(vqa_shards, base, run_dir, **more) -> list[str]:
    values = {"recipe": "vqa_synthetic", "base.path": base, "data.train": vqa_shards["train"],
              "data.val": vqa_shards["val"], "logging.run_dir": run_dir, **JOB, **more}
    return [part for key, value in values.items() for part in (f"--{key}", str(value))]


def _base_names(name: str) -> str:
    """A frozen parameter's name in the base export: without the task model's prefix and the methods' wrappers."""
    return name.removeprefix("albef.").replace(".base_layer.", ".").replace(".base.", ".")


def _train_every_method(rank: int, world: int, store: str, argv: list[str], methods: tuple[str, ...]) -> dict:
    start_deepspeed(rank, world, store)
    out = {}
    for method in methods:
        setup = prepare(parse_args([*argv, "--peft.method", method, "--name", method]))
        engine = build_engine(setup)
        module = engine.module
        trained_before = {n: held(p).detach().clone() for n, p in module.named_parameters() if p.requires_grad}
        loader, _ = setup.task.build_data(setup, rank, world)
        batches = iter(loader)
        for _ in range(2):
            batch = to_device(next(batches), engine.device, torch.float32)
            train_step(engine, [batch], Watchdog(rank, 0, setup.recipe.run_path))
        frozen = [(n, p) for n, p in module.named_parameters() if not p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in frozen]):
            state = {_base_names(n): p.detach().clone() for n, p in frozen if n.startswith("albef.")}
        moved = sum(not torch.equal(held(p), trained_before[n]) for n, p in module.named_parameters()
                    if p.requires_grad)
        out[method] = {"frozen_digest": weights_digest(state), "frozen_names": sorted(state), "trained_moved": moved,
                       "frozen_held": sum(held(p).numel() for _, p in frozen),
                       "frozen_total": sum(getattr(p, "ds_numel", p.numel()) for _, p in frozen)}
        dist.barrier()
    return out


def held(param: torch.nn.Parameter) -> torch.Tensor:
    """What this rank holds of a parameter: its ZeRO-3 partition, or (ZeRO-2) the whole of it."""
    return getattr(param, "ds_tensor", param)


@pytest.fixture(scope="session")
def zero2_config(tmp_path_factory) -> Path:
    """ds_configs/zero2.json in fp32, as cpu_zero3.json is: CPU ranks."""
    config = json.loads((DS_CONFIG_DIR / "zero2.json").read_text())
    config["bf16"]["enabled"] = False
    path = tmp_path_factory.mktemp("ds_configs") / "cpu_zero2.json"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("stage", [3, 2])
def test_every_peft_method_leaves_the_base_bit_identical(stage, vqa_shards, base_export, tokenizer, zero2_config,
                                                         tmp_path):
    argv = flags(vqa_shards, base_export, tmp_path / "runs",
                 **({"dist.ds_config": zero2_config} if stage == 2 else {}))
    results = run_on_ranks(_train_every_method, argv, ("lora", "adapter", "prefix"), store=tmp_path / "store",
                           init_group=False)
    base = open_base(base_export).state_dict
    names = sorted(n for n, _ in ALBEF(model_preset("tiny", vocab_size=len(tokenizer))).named_parameters())
    digest = weights_digest({n: base[n] for n in names})  # each parameter once (the MLM decoder shares the embeddings)
    for method in ("lora", "adapter", "prefix"):
        for rank in (0, 1):
            got = results[rank][method]
            assert got["frozen_names"] == names, (method, rank)
            assert got["frozen_digest"] == digest, (method, rank)
            assert got["trained_moved"] > 0, (method, rank)
            if stage == 3:  # frozen and still partitioned across the ranks
                assert got["frozen_held"] < got["frozen_total"] * 0.6
            else:
                assert got["frozen_held"] == got["frozen_total"]


JOB_ENV = {"ENTRY": "finetune", "GPUS_PER_NODE": "2", "MASTER_PORT": PORT}


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("finetune_runs")


@pytest.fixture(scope="module")
def job_a(vqa_shards, base_export, runs_root):
    return check(run(["bash", "launch/pretrain.sh", *flags(vqa_shards, base_export, runs_root, name="A")], env=JOB_ENV))


@pytest.fixture(scope="module")
def jobs(job_a, vqa_shards, base_export, runs_root):
    out = {"root": runs_root, "A": job_a}
    out["B1"] = check(run(["bash", "launch/pretrain.sh", *flags(vqa_shards, base_export, runs_root, name="B",
                                                                **{"schedule.exit_at_step": 2})], env=JOB_ENV))
    out["B2"] = check(run(["bash", "launch/pretrain.sh", *flags(vqa_shards, base_export, runs_root, name="B"),
                           "--resume", "auto"], env=JOB_ENV))
    return out


@pytest.fixture(scope="module")
def two_nodes(job_a, vqa_shards, base_export, runs_root):
    """A's job again on two "nodes" of one rank each (NO_SSH=1 NODE_RANK=0/1 on localhost)."""
    hostfile = runs_root / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    nodes = [(["bash", "launch/pretrain.sh", *flags(vqa_shards, base_export, runs_root, name="N")],
              {"ENTRY": "finetune", "HOSTFILE": str(hostfile), "NO_SSH": "1", "NODE_RANK": str(node),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": PORT}) for node in (0, 1)]
    return [check(node) for node in run_together(nodes)]


def test_a_two_rank_zero3_lora_run_resumes_bit_exactly(jobs):
    a, b = jobs["root"] / "A", jobs["root"] / "B"
    assert "resume_step=2" in jobs["B2"].stdout
    for key in ("loss/total", "train/vqa_score", "train/grad_norm"):
        assert [losses(a)[s][key] for s in (1, 2, 3, 4)] == [losses(b)[s][key] for s in (1, 2, 3, 4)], key
    weights_a, weights_b = (load_file(str(r / "finetuned/weights.safetensors")) for r in (a, b))
    assert weights_a.keys() == weights_b.keys() and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert json.loads((a / "eval.json").read_text()) == json.loads((b / "eval.json").read_text())


def test_two_nodes_train_like_one(two_nodes, runs_root):
    """Same data in the same order and the same initial weights as A: the same losses (to float32 reduction
    order) and saved weights."""
    a, n = runs_root / "A", runs_root / "N"
    for step in (1, 2, 3, 4):
        for key in ("loss/total", "train/vqa_score"):
            assert losses(n)[step][key] == pytest.approx(losses(a)[step][key], rel=1e-4, abs=1e-6), (step, key)
    assert losses(a)[4]["loss/total"] < losses(a)[1]["loss/total"] - 0.1  # and it learned
    weights_a, weights = (load_file(str(r / "finetuned/weights.safetensors")) for r in (a, n))
    assert weights.keys() == weights_a.keys()
    for name, tensor in weights_a.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-3, atol=1e-5, msg=name)


def test_checkpoints_and_the_saved_adapter_hold_no_base_weight(jobs, base_export):
    run_dir = jobs["root"] / "A"
    checkpoint = sum(f.stat().st_size for f in (run_dir / "checkpoints" / "step00000004").iterdir())
    base_bytes = (base_export / "model.safetensors").stat().st_size
    saved = json.loads((run_dir / "finetuned" / "finetune.json").read_text())
    assert saved["base"]["digest"] == open_base(base_export).digest
    weights = load_file(str(run_dir / "finetuned" / "weights.safetensors"))
    assert all("lora_" in n or n.startswith("answer_head.") for n in weights)
    trained = sum(t.numel() for t in weights.values())
    # fp32 weights + two Adam moments + the fp32 master copy at most, and some bookkeeping; the base alone is more
    assert checkpoint < 16 * trained + 200_000 < base_bytes


def test_the_saved_adapter_on_the_base_export_reproduces_the_runs_accuracy(jobs, base_export, other_base_export,
                                                                           vqa_shards, tokenizer):
    run_dir = jobs["root"] / "A"
    model = load_finetuned(run_dir / "finetuned")
    answers = tuple(json.loads((run_dir / "finetuned" / "finetune.json").read_text())["answers"])
    data = load_vqa_eval(vqa_shards["val"], tokenizer, VQATargets(answers), image_size=64, max_len=16)
    metrics = evaluate_vqa(model, data, 16, torch.device("cpu"))
    logged = json.loads((run_dir / "eval.json").read_text())
    assert metrics["overall"] == pytest.approx(logged["overall"], abs=1e-9)
    assert metrics["per_type"] == pytest.approx(logged["per_type"], abs=1e-9)
    with pytest.raises(RecipeError) as err:
        load_finetuned(run_dir / "finetuned", base_path=other_base_export)
    assert re.fullmatch(rf"{run_dir / 'finetuned'} was trained on a base with weight digest \w{{12}}, but "
                        rf"{other_base_export} has \w{{12}}: load it onto the base it was trained from "
                        rf"\({base_export}\)", str(err.value))


def test_resuming_onto_another_base_is_one_error_before_any_rank_starts(jobs, vqa_shards, other_base_export):
    proc = run(["bash", "launch/pretrain.sh", *flags(vqa_shards, other_base_export, jobs["root"], name="A"),
                "--resume", "auto"], env={"ENTRY": "finetune", "GPUS_PER_NODE": "2", "MASTER_PORT": PORT})
    assert proc.returncode == 2 and "spawned" not in proc.stdout + proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert re.fullmatch(rf"error: run {jobs['root'] / 'A'} was started from the base \S+ \(weight digest \w{{12}}\), "
                        rf"but base.path {other_base_export} has digest \w{{12}}: resume with the base it started "
                        "from, or start a new run with --name", line)


@pytest.mark.parametrize("override, message", [
    ({"peft.targets": ".*nowhere"}, "peft.targets '.*nowhere' matches no Linear module for lora: module names look "
     "like image_encoder.blocks.0.attn.qkv or fusion_encoder.layers.0.cross_attn.query; fix the pattern"),
    ({"peft.rank": 0}, "peft.rank is 0: it must be a positive integer"),
    ({"task.answers": 2}, "the 2 most frequent answers cover {coverage} of the {total} training answers, below "
     "task.min_answer_coverage 90.0%: raise task.answers or lower the bound"),
    ({"base.path": "/nonexistent/export"}, "base.path /nonexistent/export is neither an export (with "
     "model.safetensors and model_config.json) nor a run's checkpoints/ directory (with 'latest' and the run's "
     "model_config.json beside it): point it at runs/<name>/export, or run make pretrain first"),
    ({"model.overrides": "{text_hidden: 64}"}, "model.overrides ['text_hidden'] would change the base model's "
     "shape: a fine-tuning run may only set attention, grad_checkpointing, dropout"),
])
def test_bad_input_is_one_clear_error_in_preflight(override, message, vqa_shards, base_export, tmp_path):
    from data_pipeline.vqa import answer_vocabulary

    vocabulary = answer_vocabulary(vqa_shards["train"], 2)
    message = message.format(coverage=f"{vocabulary.coverage:.1%}", total=vocabulary.total)
    with pytest.raises(RecipeError) as err:
        prepare(parse_args(flags(vqa_shards, base_export, tmp_path, **override)))
    assert str(err.value) == message


def test_every_recipe_field_is_a_flag():
    args = parse_args(["--peft.method", "adapter", "--task.answers", "7"])
    assert args.__dict__["peft.method"] == "adapter" and FinetuneRecipe().peft.method == "lora"


def test_a_merged_lora_result_gives_the_adapters_outputs(jobs, vqa_shards, tokenizer, tmp_path):
    finetuned = jobs["root"] / "A" / "finetuned"
    merged_dir = export_merged(finetuned, tmp_path / "merged")
    weights = load_file(str(merged_dir / "weights.safetensors"))
    assert not any("lora_" in name for name in weights)
    assert "albef.text_encoder.layers.0.self_attn.qkv.weight" in weights
    adapter, merged = load_finetuned(finetuned), load_finetuned(merged_dir)
    answers = tuple(json.loads((finetuned / "finetune.json").read_text())["answers"])
    data = load_vqa_eval(vqa_shards["val"], tokenizer, VQATargets(answers), image_size=64, max_len=16)
    batch = next(data.batches(16))
    with torch.no_grad():
        args = (batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        expected, got = adapter.answer_logits(*args), merged.answer_logits(*args)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    with pytest.raises(RecipeError) as err:
        export_merged(merged_dir, tmp_path / "again")
    assert str(err.value) == f"{merged_dir} was trained with peft none: only LoRA merges into the base weights"
