"""The main job for real: DeepSpeed ZeRO-3 with 2 CPU ranks over gloo, launched as users launch it.

Runs (module-scoped, shared by the tests below):
  A  `deepspeed --num_gpus 2 launch/pretrain.sh`, 8 steps, checkpoint at 4, eval + export at the end
  B  `bash launch/pretrain.sh` stopping at step 3, mid-epoch (schedule.exit_at_step), then `--resume auto`
  C  two "nodes" of one rank each on localhost (`--no_ssh --node_rank 0/1`; node 1 via the bash form), 8 steps
A, B and C see the same data in the same order, so their per-step losses must agree.
"""

import errno
import json
import re
import shutil
import sys

import pytest
import torch

from pretrain.model import ALBEF, ModelConfig
from pretrain.train import export as export_module
from pretrain.train.engine import rank_seed
from pretrain.train.export import load_exported
from tests.helpers.jobs import (
    DEEPSPEED,
    PORT,
    REPO,
    TINY_JOB,
    check,
    free_port,
    logged_rows,
    losses,
    recipe_flags,
    run,
    run_together,
)

pytestmark = pytest.mark.slow
STEPS = TINY_JOB["schedule.max_steps"]
LEARN = {"optim.lr": "1e-3", "eval.batch_size": 16, "eval.itm_rerank_k": 4}  # the tiny job, learning visibly
# ALBEF's momentum distillation with a queue that wraps around within the 8 steps of 16 pairs, so checkpoints,
# resume and export carry (or drop) a teacher and a queue
DISTILL = {"model.momentum_distillation": "true", "model.queue_size": 24}


@pytest.fixture(scope="module")
def runs(synthetic_shards, tokenizer_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")

    def flags(name: str, val: bool = False, **more) -> list[str]:
        return recipe_flags(synthetic_shards, tokenizer_dir, root, TINY_JOB, LEARN, DISTILL, {"name": name}, more,
                            val=val)

    out = {"root": root}
    out["A"] = check(run(DEEPSPEED + ["--num_gpus", "2", "--master_port", PORT, "launch/pretrain.sh",
                                      *flags("A", val=True)]))

    bash_env = {"GPUS_PER_NODE": "2", "MASTER_PORT": PORT}
    out["B1"] = check(run(["bash", "launch/pretrain.sh", *flags("B", **{"schedule.exit_at_step": 3})],
                          env=bash_env))  # mid-epoch: 2 batches/epoch
    out["B2"] = check(run(["bash", "launch/pretrain.sh", *flags("B"), "--resume", "auto"], env=bash_env))

    hostfile = root / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    c_flags = flags("C", **{"checkpoint.keep": 1})
    # node 0 with DeepSpeed's own flags; node 1 through the bash form that launch/slurm.sbatch uses
    node0 = DEEPSPEED + ["--hostfile", str(hostfile), "--no_ssh", "--node_rank", "0", "--master_addr", "127.0.0.1",
                         "--master_port", PORT, "launch/pretrain.sh", *c_flags]
    node1 = ["bash", "launch/pretrain.sh", *c_flags]
    node1_env = {"HOSTFILE": str(hostfile), "NO_SSH": "1", "NODE_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": PORT}
    out["C"] = run_together([(node0, None), (node1, node1_env)])
    return out


def test_the_start_up_line_says_what_is_on(runs):
    root = runs["root"]
    attention = json.loads((root / "A" / "model_config.json").read_text())["attention"]
    on = f"world_size=2 zero_stage=3 bf16=off dtype=torch.float32 attention={attention}"  # cpu_zero3.json: fp32
    assert f"[vlpretrain] {on} resume_step=0 run={root / 'A'}" in runs["A"].stdout.splitlines()
    assert f"[vlpretrain] {on} resume_step=3 run={root / 'B'}" in runs["B2"].stdout.splitlines()


def test_zero3_partitions_parameters_across_ranks(runs):
    # ranks print concurrently, so lines can interleave: search the whole output
    found = re.findall(r"rank (\d) holds (\d+) of (\d+) parameter elements", runs["A"].stdout)
    held = {int(rank): int(count) for rank, count, _ in found}
    total = int(found[0][2])
    assert sorted(held) == [0, 1]
    for count in held.values():
        assert abs(count - total / 2) / total < 0.01  # each rank really holds about half
    # Initialisation reached the partitioned parameters: an uninitialised (zero) [CLS] token meets a
    # LayerNorm with eps 1e-12 and the first gradient norm is ~1e4 (initialised: ~115 with the recipe's
    # caption-word loss at weight 30).
    assert losses(runs["root"] / "A")[1]["train/grad_norm"] < 1000


def test_training_lowers_the_loss(runs):
    steps = losses(runs["root"] / "A")
    assert sorted(steps) == list(range(1, STEPS + 1))
    first = (steps[1]["loss/total"] + steps[2]["loss/total"]) / 2
    last = (steps[STEPS - 1]["loss/total"] + steps[STEPS]["loss/total"]) / 2
    assert last < first - 0.3, (first, last)


def test_resume_reproduces_the_uninterrupted_run(runs):
    assert "exiting at step 3" in runs["B1"].stdout
    assert "resume_step=3" in runs["B2"].stdout
    uninterrupted, resumed = losses(runs["root"] / "A"), losses(runs["root"] / "B")
    logged = [json.loads(line)["step"] for line in (runs["root"] / "B" / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, STEPS + 1))  # each step logged once across the two jobs
    for step in range(1, STEPS + 1):
        for key in ("loss/total", "loss/itc", "loss/itm", "loss/mlm"):
            assert resumed[step][key] == pytest.approx(uninterrupted[step][key], rel=1e-4, abs=1e-5), (step, key)
    # the teacher's partitions and the queue at the end: bit for bit, with the queue wrapped around
    final = {run: teacher_and_queue(runs["root"] / run / "checkpoints" / f"step{STEPS:08d}") for run in "AB"}
    assert final["A"].keys() == final["B"].keys() and len(final["A"]) > 100
    for name, tensor in final["A"].items():
        assert torch.equal(final["B"][name], tensor), name
    assert final["A"]["0:momentum.queue.position"].item() == STEPS * 16 % 24
    assert (final["A"]["0:momentum.queue.image_ids"] >= 0).all()  # filled
    assert final["A"]["0:momentum.steps"].item() == STEPS


def teacher_and_queue(tag_dir) -> dict[str, torch.Tensor]:
    """Each rank's saved teacher fragments and momentum buffers, keyed '<rank>:<name>'."""
    out = {}
    for rank in (0, 1):
        states = torch.load(tag_dir / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt", weights_only=False)
        frozen = {k: v for k, v in states["frozen_param_fragments"].items() if k.startswith("momentum.")}
        buffers = {k: v for k, v in states["module"].items() if k.startswith("momentum.") and v.numel()}
        out |= {f"{rank}:{k}": v for k, v in {**frozen, **buffers}.items()}
    return out


def test_two_nodes_on_localhost_train_like_one(runs):
    for node in runs["C"]:
        check(node)
    single, multi = losses(runs["root"] / "A"), losses(runs["root"] / "C")
    for step in range(1, STEPS + 1):
        assert multi[step]["loss/total"] == pytest.approx(single[step]["loss/total"], rel=1e-4)
    ckpt = runs["root"] / "C" / "checkpoints"
    tags = sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step"))
    assert tags == ["step00000008"]  # checkpoint.keep 1: the step-4 checkpoint was pruned
    assert (ckpt / "latest").read_text() == "step00000008" and not (ckpt / "latest.tmp").exists()


def documented_tags() -> dict[str, set[str]]:
    """The TensorBoard tags docs/training.md promises, by kind, with `{a,b}` alternatives expanded."""
    text = (REPO / "docs" / "training.md").read_text()
    listing = text[text.index("TensorBoard (rank 0) gets these tags"):text.index("The console prints")]
    tags = {}
    for item in listing.split("\n- ")[1:]:  # "scalars: ...", "images: ...", "text: ..."
        kind, _, described = item.partition(":")
        tags[kind] = set()
        for pattern in re.findall(r"`([a-z_]+/[^`]+)`", described):
            expanded = [pattern]
            while "{" in expanded[0]:
                expanded = [t[: t.index("{")] + choice + t[t.index("}") + 1:]
                            for t in expanded for choice in t[t.index("{") + 1: t.index("}")].split(",")]
            tags[kind] |= set(expanded)
    return tags


def test_tensorboard_has_every_documented_tag(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(runs["root"] / "A"), size_guidance={"scalars": 0, "images": 0}).Reload()
    tags = events.Tags()
    documented = documented_tags()
    assert {"loss/itc", "train/itc_negative_sim", "perf/data_wait_fraction", "eval/t2i_r10"} <= documented["scalars"]
    per_reason = {t for t in documented["scalars"] if "<reason>" in t}
    assert per_reason == {"data/skipped_<reason>"}  # clean data here: the per-reason tags are checked on hostile shards
    assert documented["scalars"] - per_reason <= set(tags["scalars"]), documented["scalars"] - set(tags["scalars"])
    assert documented["images"] == {"eval/retrieval_examples"} and documented["images"] <= set(tags["images"])
    assert all(any(t.startswith(tag) for t in tags["tensors"]) for tag in documented["text"])
    assert len(events.Scalars("loss/total")) == STEPS
    lr = [event.value for event in events.Scalars("train/lr")]
    assert lr[0] < lr[1] and lr[-1] < max(lr)  # warmup, then cosine decay


def test_exported_weights_reproduce_the_training_time_metrics(runs, synthetic_shards, tmp_path):
    run_dir = runs["root"] / "A"
    trained = json.loads((run_dir / "eval.json").read_text())
    assert trained["num_images"] == 12 and trained["num_texts"] == 60 and trained["itm_rerank_k"] == 4
    out = run_dir / "reeval.json"
    check(run([sys.executable, "-m", "pretrain.evaluate", "--checkpoint", str(run_dir / "export"), "--data",
               str(synthetic_shards["val"]), "--batch-size", "16", "--itm-rerank-k", "4", "--out", str(out)]))
    again = json.loads(out.read_text())
    for direction in ("i2t", "t2i"):
        assert again[direction] == pytest.approx(trained[direction])
    # one process against 2 ranks that split the triples (rank 1's share is all padding at 12 images): within a
    # triple (1/36) of each other, where a logit's last bits can tip an argmax
    assert again["itm_accuracy"] == pytest.approx(trained["itm_accuracy"], abs=1 / 36)
    # the DeepSpeed checkpoint directory itself is accepted too (consolidated to fp32 on the fly), and what the
    # command line leaves out (val shards, tokenizer, batch size, re-ranking) comes from the run's recipe.yaml
    copy = tmp_path / "A"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("eval.json"))
    check(run([sys.executable, "-m", "pretrain.evaluate", "--checkpoint", str(copy / "checkpoints")]))
    again = json.loads((copy / "eval.json").read_text())  # into the run directory
    assert again["itm_rerank_k"] == 4 and again["t2i"] == pytest.approx(trained["t2i"])
    assert not list(copy.glob("*/eval.json"))  # nothing written into export/ or checkpoints/


def test_deepspeeds_own_zero_to_fp32_reads_our_checkpoints(runs, tmp_path):
    ckpt = runs["root"] / "A" / "checkpoints"
    # DeepSpeed's --safe_serialization refuses tied weights (MLM decoder = word embeddings); the default
    # torch format is read back with weights_only=True, so nothing is unpickled beyond tensors.
    check(run([sys.executable, str(ckpt / "zero_to_fp32.py"), str(ckpt), str(tmp_path)]))
    state = torch.load(next(tmp_path.glob("*.bin")), weights_only=True)
    config = ModelConfig(**json.loads((runs["root"] / "A" / "model_config.json").read_text()))
    fresh = ALBEF(config)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    # tied to the word embeddings, the online model's and the teacher's
    assert not unexpected and set(missing) <= {"mlm_head.decoder.weight", "momentum.mlm_head.decoder.weight"}
    assert any(name.startswith("momentum.") for name in state)  # the checkpoint carries the teacher
    exported = load_exported(runs["root"] / "A" / "export")
    assert exported.momentum is None  # the export is the online model alone
    for name, tensor in exported.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name


def test_exported_hf_encoders_load_with_automodel(runs):
    from transformers import AutoModel

    export = runs["root"] / "A" / "export"
    assert type(AutoModel.from_pretrained(export / "text_encoder")).__name__ == "BertModel"
    assert type(AutoModel.from_pretrained(export / "image_encoder")).__name__ == "ViTModel"
    assert (export / "tokenizer" / "tokenizer.json").is_file()
    assert not (runs["root"] / "A" / "export.tmp").exists()  # written there, then renamed whole


def exported_files(export) -> dict:
    return {path.relative_to(export): path.read_bytes() for path in export.rglob("*") if path.is_file()}


def test_an_interrupted_export_never_looks_complete(runs, tokenizer, tmp_path, monkeypatch):
    run_dir, export = runs["root"] / "A", tmp_path / "export"
    shutil.copytree(run_dir / "export", export)  # the export of an earlier run
    earlier = exported_files(export)

    def disk_full(model, out_dir) -> None:  # after the weights, before the HF encoders
        (out_dir / "text_encoder").mkdir()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_module, "export_hf", disk_full)
    config = ModelConfig(**json.loads((run_dir / "model_config.json").read_text()))
    with pytest.raises(OSError, match="No space left on device"):
        export_module.export_run(run_dir / "checkpoints", config, tokenizer, export)
    assert exported_files(export) == earlier  # untouched: the part written so far is only in export.tmp
    assert sorted(p.name for p in (tmp_path / "export.tmp").iterdir()) == [
        "model.safetensors", "model_config.json", "text_encoder"]


def test_rerunning_a_finished_run_only_evaluates_it_again(runs, synthetic_shards, tokenizer_dir):
    root, run_dir = runs["root"], runs["root"] / "A-again"
    shutil.copytree(root / "A", run_dir)  # a finished run, as `make pretrain` finds it when run again
    (run_dir / "eval.json").unlink()
    checkpoint = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in (run_dir / "checkpoints").rglob("*")}
    flags = recipe_flags(synthetic_shards, tokenizer_dir, root, TINY_JOB, LEARN, DISTILL, {"name": "A-again"}, val=True)
    proc = check(run(["bash", "launch/pretrain.sh", *flags, "--resume", "auto"],
                     env={"GPUS_PER_NODE": "2", "MASTER_PORT": PORT}))
    assert f"resume_step={STEPS} run={run_dir}" in proc.stdout
    assert not re.search(r"^step \d+/", proc.stdout, re.M)  # no training step: no step line
    trained = [row for row in logged_rows(root / "A") if "loss/total" in row]
    assert [row for row in logged_rows(run_dir) if "loss/total" in row] == trained
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in (run_dir / "checkpoints").rglob("*")} == checkpoint
    assert json.loads((run_dir / "eval.json").read_text()) == json.loads((root / "A" / "eval.json").read_text())
    assert f"done at step {STEPS}" in proc.stdout


def test_the_bash_launcher_writes_the_environment_of_ranks_started_over_ssh(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    forwarded = {"NCCL_SOCKET_IFNAME": "eth0", "FI_PROVIDER": "efa", "UCX_TLS": "rc", "HF_HOME": str(tmp_path / "hf"),
                 "CUDA_DEVICE_MAX_CONNECTIONS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env_file = REPO / ".deepspeed_env"  # where DeepSpeed's runner, started in the repository, reads it
    before = env_file.read_bytes() if env_file.exists() else None
    try:  # the file is written before the recipe is checked: a bad recipe stops it before any ssh
        proc = run(["bash", "launch/pretrain.sh", "--recipe", "tiny_synthetic", "--data.train", str(tmp_path / "x")],
                   env={"HOSTFILE": str(hostfile), "PYTHONPATH": "/site", "NOT_FORWARDED": "1", **forwarded})
        written = env_file.read_text().splitlines()
    finally:
        env_file.unlink(missing_ok=True)
        if before is not None:
            env_file.write_bytes(before)
    assert proc.returncode == 2 and "spawned" not in proc.stdout + proc.stderr, proc.stderr
    assert f"PYTHONPATH={REPO}:/site" in written  # the ranks import this checkout, with the caller's path after
    assert {f"{key}={value}" for key, value in forwarded.items()} <= set(written)
    assert not [line for line in written if line.startswith("NOT_FORWARDED=")]


def test_bad_config_fails_once_before_any_rank_starts(synthetic_shards, tokenizer_dir, tmp_path):
    nope = tmp_path / "nope"
    proc = run(["bash", "launch/pretrain.sh", "--recipe", "tiny_synthetic", "--data.train", str(nope),
                "--data.tokenizer", str(tokenizer_dir)], env={"GPUS_PER_NODE": "2"})
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert errors == [f"error: 1 of 1 shards in '{nope}' are missing (e.g. {nope}); check the spec or rerun "
                      "make_shards"], proc.stderr
    assert "spawned" not in proc.stdout + proc.stderr  # the DeepSpeed launcher never started


def test_pretrained_hf_weights_land_in_zero3_partitions_and_ranks_train_with_seeds_of_their_own(
        tokenizer, tokenizer_dir, synthetic_shards, tmp_path):
    from tests.helpers.hf import hf_bert, hf_vit

    hf_vit().save_pretrained(tmp_path / "vit")  # the tiny preset's ViT and BERT (2 text + 2 fusion layers), seeded
    hf_bert(vocab_size=len(tokenizer)).save_pretrained(tmp_path / "bert")
    flags = recipe_flags(synthetic_shards, tokenizer_dir, tmp_path / "runs",
                         {"model.vit": tmp_path / "vit", "model.bert": tmp_path / "bert"})
    launch = ["--num_gpus", "2", "--master_port", str(free_port()), "tests/train/zero3_pretrained_probe.py"]
    proc = check(run(DEEPSPEED + launch + flags, env={"PYTHONPATH": str(REPO)}))
    report = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith('{"loaded"')))
    assert report["max_abs_diff"] == 0.0
    assert report["partitioned"] > 0.9 * report["loaded"]  # really copied into shards, not whole tensors
    names = report["names"]
    assert any(n.startswith("image_encoder.") for n in names) and any(n.startswith("fusion_encoder.") for n in names)
    assert "text_encoder.embeddings.word_embeddings.weight" in names
    # the same weights everywhere, then independent ITM negative draws and dropout per rank, reproducibly
    assert report["rank_seeds"] == [rank_seed(0, 0), rank_seed(0, 1)] and rank_seed(0, 0) != rank_seed(0, 1)
