"""Preflight measures how the tokenizer cuts a sample of the training captions and warns, in one line naming
the fix, when it was trained on other text (the bundled synthetic tokenizer on real captions)."""

import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from data_pipeline import clean_caption, resolve_shards
from data_pipeline.make_shards import main as make_shards_main
from data_pipeline.tokenizer import caption_sample, tokenizer_fit
from data_pipeline.train_tokenizer import shard_captions, train_tokenizer
from pretrain.train.cli import main as train_main
from tests.helpers.data import image_bytes, write_coco
from tests.helpers.jobs import recipe_flags

# COCO-style captions: everyday words the synthetic shape scenes never use
REAL_CAPTIONS = [
    "A young man riding a wave on top of a surfboard.",
    "Two giraffes standing next to each other in a zoo.",
    "A plate of food with broccoli, rice and chicken.",
    "A woman holding an umbrella while walking down the street.",
    "A black dog catching a frisbee in the park.",
    "People sitting at a table eating pizza together.",
    "An old train traveling down the tracks near a station.",
    "A cat sleeping on a laptop keyboard.",
]


def test_the_fit_counts_split_words_and_unknown_tokens():
    vocab = {w: i for i, w in enumerate(["[UNK]", "a", "man", "dog", "run", "##s", "##ning", "r", "##u", "##n"])}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    # a | man | dog ##s | run ##ning | [UNK] (zebra: no piece fits) | a
    fit = tokenizer_fit(tokenizer, ["a man dogs", "running zebra a", ""])
    assert (fit.words, fit.split_words, fit.tokens, fit.unknown_tokens) == (6, 2, 8, 1)
    assert fit.split_fraction == pytest.approx(2 / 6) and fit.unknown_fraction == pytest.approx(1 / 8)


@pytest.fixture(scope="module")
def real_shards(tmp_path_factory):
    """Training shards of COCO-style captions (8 images of 80 px, one caption each)."""
    root = tmp_path_factory.mktemp("real_coco")
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "data": image_bytes(80, 80, (40 * i, 90, 200 - 20 * i))}
              for i in range(len(REAL_CAPTIONS))]  # fmt: skip
    write_coco(root, "train", images, list(enumerate(REAL_CAPTIONS)))
    out = tmp_path_factory.mktemp("real_shards")
    make_shards_main(["--source", "coco", "--root", str(root), "--name", "real", "--out", str(out), "--splits",
                      "train", "--workers", "1", "--quiet"])
    return out / "train"


def validate(flags: list[str], capsys) -> list[str]:
    """`python -m pretrain.train --validate-only`'s stderr lines (as launch/pretrain.sh runs it once)."""
    assert train_main([*flags, "--validate-only"]) == 0
    return capsys.readouterr().err.splitlines()


def test_the_synthetic_tokenizer_on_real_captions_is_one_warning_with_the_measured_rates(
        real_shards, synthetic_shards, tokenizer, tokenizer_dir, tmp_path, capsys):  # fmt: skip
    flags = recipe_flags({"train": real_shards}, tokenizer_dir, tmp_path)
    warnings = validate(flags, capsys)
    # the rates counted word by word here, apart from tokenizer_fit's batch call
    words = [w for caption in shard_captions(str(real_shards)) for w in caption.split()]
    pieces = [tokenizer.tokenize(word) for word in words]
    split = sum(len(p) > 1 for p in pieces) / len(words)
    unknown = sum(p.count("[UNK]") for p in pieces) / sum(len(p) for p in pieces)
    assert split > 0.5  # most real words cut into characters, as the issue saw ("young": y ##o ##u ##ng)
    assert len(pieces[words.index("young")]) >= 3
    assert warnings == [
        f"warning: the tokenizer {tokenizer_dir} cuts {split:.0%} of the words of {len(REAL_CAPTIONS)} training "
        f"captions into pieces and reads {unknown:.1%} of their tokens as [UNK]: it was not trained on captions "
        f"like these; train one on them (`make tokenizer TOKENIZER_SHARDS={real_shards} "
        "TOKENIZER_DIR=data/tokenizer-NAME`, which `make shards` does for a real source) and pass it with "
        "--data.tokenizer, or use --data.tokenizer bert-base-uncased"]
    # no warning where the tokenizer fits: the synthetic one on its own captions, one trained on the real ones
    assert validate(recipe_flags(synthetic_shards, tokenizer_dir, tmp_path), capsys) == []
    fitted = tmp_path / "tokenizer-real"
    train_tokenizer(shard_captions(str(real_shards)), str(fitted), vocab_size=500, min_frequency=1)
    assert validate(recipe_flags({"train": real_shards}, fitted, tmp_path), capsys) == []


def test_a_damaged_shard_is_passed_over_as_the_loader_does(real_shards, tokenizer_dir, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    shutil.copytree(real_shards, damaged)
    shards = resolve_shards(str(damaged)).shards
    assert len(shards) == len(REAL_CAPTIONS)  # one image (one caption) a shard
    intact = caption_sample(str(damaged), 256)
    assert sorted(intact) == sorted(clean_caption(c) for c in REAL_CAPTIONS)
    Path(shards[0].path).write_bytes(b"not a tar" * 100)  # e.g. cut short by a full disk
    assert caption_sample(str(damaged), 256) == intact[1:]
    warnings = validate(recipe_flags({"train": damaged}, tokenizer_dir, tmp_path), capsys)
    assert len(warnings) == 1 and f"of the words of {len(REAL_CAPTIONS) - 1} training captions" in warnings[0]
