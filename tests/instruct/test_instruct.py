"""python -m pretrain.instruct on the pretraining engine: 2 ranks, ZeRO-3, through the launcher as users run it.

Stage 1 (align) trains only the projections (the projector's, the fused instruction's): its export holds the
base encoders and LM bit for bit; a run stopped and resumed logs the same losses and exports the same weights as
one that ran straight through. Stage 2 from that export trains the LM through LoRA, merged into the export that
pretrain.generate answers with, and keeps the export's projector (a recipe asking for another is one error)."""

import hashlib
import json

import pytest
import torch
import webdataset as wds
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from data_pipeline.lm_tokenizer import shard_texts
from data_pipeline.make_instructions import main as make_instructions
from pretrain.generate import DEFAULT_PROMPT, answer_shards
from pretrain.model.multimodal_lm import MultimodalLM
from tests.helpers.jobs import PORT, check, losses, run
from tests.helpers.multimodal import write_export, write_lm

STEPS = {"schedule.max_steps": 4, "schedule.warmup_steps": 1, "schedule.micro_batch_size": 4, "logging.every": 1,
         "checkpoint.every": 2, "lm.image_tokens": 4, "data.max_len": 160, "eval.samples": 4, "eval.batch_size": 4,
         "eval.max_new_tokens": 6}
ENV = {"ENTRY": "instruct", "GPUS_PER_NODE": "2", "MASTER_PORT": PORT}
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def parts(synthetic_shards, vqa_shards, tokenizer_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("instruct")
    make_instructions(["--captions", str(synthetic_shards["train"].parent), "--vqa", str(vqa_shards["train"].parent),
                       "--out", str(root / "set"), "--quiet", "--min-shards", "4"])
    lm = write_lm(root / "lm", texts=shard_texts(str(synthetic_shards["train"])))  # fits the captions
    return {"root": root, "set": root / "set", "export": write_export(root / "export"), "lm": lm,
            "tokenizer": tokenizer_dir}


def flags(parts, name: str, *, stage: str = "align", base=None, **more) -> list[str]:
    values = {"recipe": f"instruct_stage{1 if stage == 'align' else 2}_synthetic", "name": name,
              "base.path": base or parts["export"], "lm.name": parts["lm"], "data.train": parts["set"] / "train",
              "data.val": parts["set"] / "val", "data.tokenizer": parts["tokenizer"],
              "logging.run_dir": parts["root"] / "runs", **STEPS, **more}
    return [x for k, v in values.items() for x in (f"--{k}", str(v))]


def digest(tensors: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode() + tensors[name].detach().double().numpy().tobytes())
    return h.hexdigest()


def params(model: MultimodalLM, prefix: str) -> dict:
    return {n: p for n, p in model.named_parameters() if n.startswith(prefix)}


@pytest.fixture(scope="module")
def jobs(parts):
    launch = ["bash", "launch/pretrain.sh"]
    out = {"A": check(run([*launch, *flags(parts, "A")], env=ENV)),
           "B1": check(run([*launch, *flags(parts, "B", **{"schedule.exit_at_step": 2})], env=ENV)),
           "B2": check(run([*launch, *flags(parts, "B"), "--resume", "auto"], env=ENV))}
    return out


FROZEN = ("image_encoder.", "lm.", "question_fusion.text_encoder.", "question_fusion.fusion_encoder.")


def test_stage1_changes_only_the_projections(jobs, parts):
    """The recipe fuses the instruction with the image (lm.fuse_question): its projection trains, its
    encoders do not."""
    runs = parts["root"] / "runs"
    trained = MultimodalLM.from_pretrained(runs / "A" / "export")
    torch.manual_seed(0)  # the recipe's seed draws the new projections
    start = MultimodalLM.build(parts["export"], str(parts["lm"]), image_tokens=4, fuse_question=True)
    for prefix in FROZEN:
        assert digest(params(trained, prefix)) == digest(params(start, prefix)), prefix
    for prefix in ("projector.", "question_fusion.projection."):
        fresh = params(start, prefix)
        assert fresh and all(not torch.equal(p, fresh[n]) for n, p in params(trained, prefix).items()), prefix
    # projector 128x64 + 64 + 64x64 + 64, the fused [CLS]'s projection 128x64 + 64 + 64x64 + 64
    assert "stage align: 24832 of" in jobs["A"].stdout


def test_a_two_rank_zero3_run_resumes_bit_exactly(jobs, parts):
    a, b = parts["root"] / "runs" / "A", parts["root"] / "runs" / "B"
    assert "resume_step=2" in jobs["B2"].stdout
    for key in ("loss/total", "train/token_accuracy", "train/grad_norm"):
        assert [losses(a)[s][key] for s in (1, 2, 3, 4)] == [losses(b)[s][key] for s in (1, 2, 3, 4)], key
    first, second = (MultimodalLM.from_pretrained(r / "export") for r in (a, b))
    assert digest(dict(first.named_parameters())) == digest(dict(second.named_parameters()))
    evaluation = json.loads((a / "instruct_eval.json").read_text())  # eval.samples 4 of each task
    # both ranks answered on the partitioned model (batches of 4: one each), as one process answers from the export
    # (each batch carried its instructions for the fusion encoder, or the forward would have raised)
    alone, _, _ = answer_shards(first.eval(), str(parts["set"] / "val"), DEFAULT_PROMPT, 4, 4,
                                {"max_new_tokens": 6, "do_sample": False})
    assert sorted(map(json.dumps, evaluation["examples"])) == sorted(map(json.dumps, alone))
    assert len({row["task"] for row in alone}) == 2
    # captions asked in training phrasings and in held-out ones are scored apart
    held_out = [row["held_out"] for row in alone if row["task"] == "caption"]
    blocks = {name: n for name, n in (("captioning", held_out.count(False)),
                                      ("captioning_held_out_phrasings", held_out.count(True))) if n}
    assert evaluation["samples"] == 8 and evaluation["vqa"]["questions"] == len(held_out) == 4
    assert {name: evaluation[name]["captions"] for name in blocks} == blocks
    assert "captioning" in blocks or "captioning" not in evaluation
    assert all(0 <= evaluation[name]["bleu4"] <= 1 for name in blocks) and 0 <= evaluation["vqa"]["accuracy"] <= 1
    events = EventAccumulator(str(a))
    events.Reload()
    assert "eval/instruct_examples" in events.Tags()["images"]  # the page of examples
    tags = {"captioning": "eval/cider", "captioning_held_out_phrasings": "eval/held_out_phrasings/cider"}
    assert {tags[name] for name in blocks} | {"eval/vqa_accuracy", "eval/vqa_majority_baseline"} <= set(
        events.Tags()["scalars"])


def test_stage2_lora_from_the_stage1_export_trains_the_lm_and_exports_it_merged(jobs, parts):
    stage1 = parts["root"] / "runs" / "A" / "export"
    proc = check(run(["bash", "launch/pretrain.sh", *flags(parts, "S2", stage="instruct", base=stage1,
                                                           **{"stage.lm_training": "lora"})], env=ENV))
    assert "stage instruct:" in proc.stdout
    before, after = MultimodalLM.from_pretrained(stage1), MultimodalLM.from_pretrained(
        parts["root"] / "runs" / "S2" / "export")
    for prefix in FROZEN[:1] + FROZEN[2:]:
        assert digest(params(before, prefix)) == digest(params(after, prefix)), prefix
    assert digest(params(before, "lm.")) != digest(params(after, "lm."))  # the adapters, merged
    assert params(before, "lm.").keys() == params(after, "lm.").keys()  # a plain LM again
    unfused = run(["bash", "launch/pretrain.sh", *flags(parts, "S2-unfused", stage="instruct", base=stage1,
                                                        **{"lm.fuse_question": "false"})], env=ENV)
    assert unfused.returncode == 2
    assert "lm.fuse_question is false but the base" in unfused.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("override, message", [
    ({"stage.name": "pretrain"}, "stage.name 'pretrain' / stage.lm_training 'full': use a stage of align, instruct"),
    ({"lm.image_tokens": 5}, "image_tokens 5 pooled from the patch grid must be a square"),
    ({"stage.loss_per": "answer"}, "stage.loss_per 'answer' is unknown: use token or conversation"),
    ({"stage.encoder_lr_scale": 0.1}, "stage.encoder_lr_scale 0.1 needs stage.train_encoder true"),
])  # fmt: skip
def test_bad_input_is_one_clear_error_before_any_rank_starts(parts, override, message):
    proc = run(["bash", "launch/pretrain.sh", *flags(parts, "bad", **override)], env=ENV)
    assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1]


def test_an_lm_whose_tokenizer_does_not_fit_and_a_set_without_answers(parts, tmp_path):
    grown = write_lm(tmp_path / "grown", extra_tokens=40)
    proc = run(["bash", "launch/pretrain.sh", *flags(parts, "bad", **{"lm.name": grown})], env=ENV)
    assert proc.returncode == 2 and "the LM embeds only" in proc.stderr.strip().splitlines()[-1]
    for i in range(2):
        with wds.TarWriter(str(tmp_path / f"q-{i}.tar")) as writer:
            writer.write({"__key__": f"s{i}", "jpg": b"x", "json": json.dumps(
                {"captions": ["a"], "conversations": [{"role": "user", "content": "<image>\nhi"}]}).encode()})
    proc = run(["bash", "launch/pretrain.sh", *flags(parts, "bad", **{"data.train": tmp_path / "q-{0..1}.tar"})],
               env=ENV)
    assert proc.returncode == 2 and "has a conversation with an assistant turn" in proc.stderr.strip().splitlines()[-1]
