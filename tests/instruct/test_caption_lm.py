"""The embedded default LM: its BPE tokenizer trained on the captions, then the Llama-architecture LM trained on
their text as a task on the pretraining engine (2 ranks, ZeRO-3, through the launcher), exported as a Hub model."""

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from data_pipeline.lm_tokenizer import main as lm_tokenizer
from data_pipeline.lm_tokenizer import shard_texts
from pretrain.caption_lm.cli import main as caption_lm
from tests.helpers.jobs import PORT, check, losses, run

pytestmark = pytest.mark.slow
STEPS = 12


def test_caption_lm_learns_the_captions_on_the_engine_and_exports_a_hub_model(synthetic_shards, tokenizer_dir,
                                                                              tmp_path, capsys):
    assert lm_tokenizer(["--shards", str(synthetic_shards["train"]), "--out", str(tmp_path / "tok")]) == 0
    assert capsys.readouterr().out.startswith("LM tokenizer: ")
    flags = {"recipe": "caption_lm_synthetic", "lm.tokenizer": tmp_path / "tok", "lm.hidden": 32, "lm.layers": 1,
             "lm.heads": 2, "data.train": synthetic_shards["train"], "data.val": synthetic_shards["val"],
             "data.tokenizer": tokenizer_dir, "logging.run_dir": tmp_path / "runs", "schedule.max_steps": STEPS,
             "schedule.warmup_steps": 2, "logging.every": 1, "checkpoint.every": 6, "eval.samples": 8}
    proc = check(run(["bash", "launch/pretrain.sh", *[x for k, v in flags.items() for x in (f"--{k}", str(v))]],
                     env={"ENTRY": "caption_lm", "GPUS_PER_NODE": "2", "MASTER_PORT": PORT}))
    run_dir = tmp_path / "runs" / "caption-lm"
    logged = losses(run_dir)
    # byte-level BPE starts near log(vocab); a few steps learn the synthetic words
    assert logged[STEPS]["loss/total"] < logged[1]["loss/total"] - 0.5, logged
    held_out = json.loads((run_dir / "eval.json").read_text())
    assert held_out["loss"] < logged[1]["loss/total"] - 0.5 and held_out["tokens"] > 8 * 20
    lm, tokenizer = AutoModelForCausalLM.from_pretrained(run_dir / "export"), AutoTokenizer.from_pretrained(
        run_dir / "export")
    caption = shard_texts(str(synthetic_shards["train"]))[0]
    assert tokenizer.decode(tokenizer(caption)["input_ids"]) == caption  # byte-level: case and punctuation kept
    assert lm.get_input_embeddings().num_embeddings == len(tokenizer) and tokenizer.chat_template is None
    assert tokenizer.convert_tokens_to_ids("<image>") != tokenizer.unk_token_id
    assert "caption LM: " in proc.stdout and "done at step 12" in proc.stdout


def test_a_missing_lm_tokenizer_is_one_error_before_any_rank_starts(synthetic_shards, tmp_path, capsys):
    code = caption_lm(["--recipe", "caption_lm_synthetic", "--lm.tokenizer", str(tmp_path / "none"),
                       "--data.train", str(synthetic_shards["train"]), "--validate-only"])
    assert code == 2 and capsys.readouterr().err.startswith(
        f"error: lm.tokenizer {tmp_path / 'none'} is not a trained LM tokenizer: make it with python -m "
        "data_pipeline.lm_tokenizer")
