import re
import unicodedata

import pytest
import torch
from transformers import AutoTokenizer

from data_pipeline import DataError, clean_caption, load_tokenizer
from data_pipeline.masking import mask_tokens
from data_pipeline.text import caption_normalizer
from data_pipeline.train_tokenizer import SPECIAL_TOKENS, shard_captions, train_tokenizer


def test_clean_caption_lowercases_strips_punctuation_and_caps_words():
    assert clean_caption("  A Red, CIRCLE!!  on the   left...\n") == "a red circle on the left"
    assert clean_caption("one two three four", max_words=2) == "one two"
    assert clean_caption("?!.") == ""


def test_the_tokenizer_normalizer_cleans_every_character_as_clean_caption_does():
    """Every code point Python's Unicode tables assign (282k in Python 3.11), alone and in one text: the
    normalizer exported with a tokenizer keeps, lowercases and drops exactly what clean_caption does
    (whitespace compared as the pre-tokenizer sees it, split into words). A plain `[^\\w\\s']` in the
    normalizer differs on 3,443 of them (combining marks, numbers such as "½")."""
    normalizer = caption_normalizer()
    chars = [chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) not in ("Cn", "Cs")]
    assert len(chars) > 250_000

    def tokenizer_words(text: str) -> str:
        return " ".join(normalizer.normalize_str(text).split())

    text = " ".join(chars) + " A Red, CIRCLE!!  on the   left...\n It's 3½ o'clock"
    assert tokenizer_words(text) == clean_caption(text, max_words=10**9)
    assert [c for c in chars if tokenizer_words(c) != clean_caption(c)] == []


def test_tokenizer_loads_with_auto_tokenizer_and_bert_specials(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert tokenizer.pad_token_id == 0
    assert {"[CLS]", "[SEP]", "[MASK]", "[UNK]"} <= set(tokenizer.get_vocab())
    ids = tokenizer("A RED Circle")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert ids == tokenizer("a red circle")["input_ids"]  # lowercasing
    assert tokenizer.unk_token_id not in ids  # caption words are in the vocabulary


def test_training_on_the_same_captions_gives_the_same_tokenizer_bytes(synthetic_shards, tokenizer_dir, tmp_path):
    """The session tokenizer trained again, and on the captions reversed: byte-identical files (the trainer alone
    numbers continuation tokens in hash order, and ties between merges then go either way)."""
    captions = list(shard_captions(str(synthetic_shards["train"])))
    for name, order in (("again", captions), ("reversed", captions[::-1])):
        train_tokenizer(iter(order), str(tmp_path / name), vocab_size=500, min_frequency=1)
        for file in ("tokenizer.json", "tokenizer_config.json"):
            assert (tmp_path / name / file).read_bytes() == (tokenizer_dir / file).read_bytes(), (name, file)
    vocab = AutoTokenizer.from_pretrained(str(tokenizer_dir)).get_vocab()
    ordered = sorted(vocab, key=vocab.get)
    continuation = [token for token in ordered if token.startswith("##") and len(token) == 3]
    assert ordered[: len(SPECIAL_TOKENS) + len(continuation)] == SPECIAL_TOKENS + sorted(continuation)


def test_load_tokenizer_missing_or_broken_is_a_data_error_naming_the_fix(tmp_path):
    with pytest.raises(DataError) as error:
        load_tokenizer(str(tmp_path / "absent"))
    assert re.fullmatch(rf"cannot load tokenizer '{tmp_path}/absent' \(\w+\); run `make tokenizer`", str(error.value))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError) as error:
        load_tokenizer(str(tmp_path / "broken"))
    assert str(error.value).startswith(f"cannot load tokenizer '{tmp_path / 'broken'}' (")
    assert str(error.value).endswith("); re-create it with `make tokenizer`")


def test_masking_statistics_follow_bert():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (400, 64), generator=generator)
    special = torch.zeros_like(ids)
    special[:, 0] = special[:, 40:] = 1  # [CLS] and padding
    masked, labels = mask_tokens(
        ids, special, mask_token_id=4, vocab_size=1000, generator=torch.Generator().manual_seed(1)
    )
    selected = labels != -100
    assert not selected[special.bool()].any()
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(masked[~selected], ids[~selected])
    fraction = selected.float().sum() / (special == 0).sum()
    assert 0.14 < fraction < 0.16
    to_mask = (masked[selected] == 4).float().mean()
    unchanged = (masked[selected] == ids[selected]).float().mean()
    assert 0.78 < to_mask < 0.82
    assert 0.085 < unchanged < 0.12  # 10% kept (+ random draws that hit the same token)
    assert 0.08 < 1 - to_mask - unchanged < 0.115  # 10% random


def test_masking_is_seeded():
    ids = torch.randint(10, 100, (8, 16), generator=torch.Generator().manual_seed(0))
    special = torch.zeros_like(ids)

    def run(seed):
        return mask_tokens(ids, special, mask_token_id=4, vocab_size=100, generator=torch.Generator().manual_seed(seed))

    assert all(torch.equal(a, b) for a, b in zip(run(3), run(3)))
    assert not torch.equal(run(3)[1], run(4)[1])
