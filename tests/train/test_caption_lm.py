"""The embedded default LM: a config-built Llama LM with a BPE tokenizer of the captions, trained on their text."""

from transformers import AutoModelForCausalLM, AutoTokenizer

from pretrain.caption_lm import main as caption_lm
from pretrain.caption_lm import shard_texts


def test_caption_lm_learns_the_captions_and_loads_as_a_hub_model(synthetic_shards, tmp_path, capsys):
    out = tmp_path / "lm"
    args = ["--shards", str(synthetic_shards["train"]), "--out", str(out), "--steps", "12", "--batch-size", "8",
            "--hidden", "32", "--layers", "1", "--heads", "2"]
    assert caption_lm(args) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    first, last = (float(x) for x in line.split("loss ")[1].split(" (")[0].split(" -> "))
    assert last < first - 0.5  # byte-level BPE starts near log(vocab); a few steps learn the synthetic words
    lm, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    caption = shard_texts(str(synthetic_shards["train"]))[0]
    assert tokenizer.decode(tokenizer(caption)["input_ids"]) == caption  # byte-level: case and punctuation kept
    assert lm.get_input_embeddings().num_embeddings == len(tokenizer) and tokenizer.chat_template is None
    assert tokenizer.convert_tokens_to_ids("<image>") != tokenizer.unk_token_id
