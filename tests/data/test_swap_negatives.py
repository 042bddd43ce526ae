"""Word-swapped hard-negative captions (NegCLIP; recipe field data.swap_negatives): the swap itself, its
validation, and the batch fields the loader adds only when it is on."""

import random
import re

import pytest
import torch

from data_pipeline import DataError, make_train_loader
from data_pipeline.text import check_swap_groups, swap_word

SHAPES = ["circle", "square", "triangle", "diamond"]
COLOURS = ["red", "blue"]
BATCH_KEYS = {"pixel_values", "input_ids", "attention_mask", "mlm_input_ids", "mlm_labels", "image_ids", "keys"}
SWAP_KEYS = {"swap_input_ids", "swap_attention_mask", "swap_valid"}


def _changed_words(before: str, after: str) -> list[tuple[str, str]]:
    old, new = before.split(" "), after.split(" ")
    assert len(old) == len(new)
    return [(a, b) for a, b in zip(old, new) if a != b]


def test_a_swap_changes_exactly_one_group_word_to_another_of_its_group():
    caption = "a big red circle on the left and a small blue square at the top"
    groups = [SHAPES, COLOURS]
    seen_places, seen_words = set(), set()
    for seed in range(200):
        swapped = swap_word(caption, groups, random.Random(seed))
        ((old, new),) = _changed_words(caption, swapped)
        group = next(g for g in groups if old in g)
        assert new in group and new != old
        seen_places.add(old)
        seen_words.add(new)
    # every occurrence gets drawn, and every replacement of each
    assert seen_places == {"red", "circle", "blue", "square"}
    assert seen_words == {"red", "blue", "circle", "square", "triangle", "diamond"}


def test_a_swap_is_deterministic_per_seed():
    caption = "a big red circle on the left and a small blue square at the top"
    draws = [swap_word(caption, [SHAPES, COLOURS], random.Random(seed)) for seed in range(20)]
    assert draws == [swap_word(caption, [SHAPES, COLOURS], random.Random(seed)) for seed in range(20)]
    assert len(set(draws)) > 5


def test_a_caption_without_group_words_has_no_swap():
    # whole words only: "squares" and "red" inside "reddish" are not the group's words
    assert swap_word("two reddish squares on a white background", [SHAPES, COLOURS], random.Random(0)) is None


@pytest.mark.parametrize(
    "groups, message",
    [
        ([["circle"]], "swap group ['circle'] needs at least two words: give each group two or more distinct words "
                       "in data.swap_negatives"),
        ([["circle", "circle"]], "swap group ['circle', 'circle'] repeats a word: give each group two or more "
                                 "distinct words in data.swap_negatives"),
        ([["circle", "Square"]], "swap word 'Square' is not a single lowercase word without punctuation (as cleaned "
                                 "captions spell it): fix data.swap_negatives"),
        ([["circle", "big square"]], "swap word 'big square' is not a single lowercase word without punctuation (as "
                                     "cleaned captions spell it): fix data.swap_negatives"),
        ([["circle", "square"], ["square", "red"]], "swap word 'square' is in two groups: keep it in one of "
                                                    "data.swap_negatives"),
    ],
)
def test_unusable_swap_groups_are_one_error(groups, message):
    with pytest.raises(DataError, match=f"^{re.escape(message)}$"):
        check_swap_groups(groups)


def _batches(shards, tokenizer, **overrides) -> list[dict]:
    options = dict(batch_size=5, rank=0, world_size=1, num_workers=0, seed=0, image_size=32, max_len=24, hflip=True)
    return list(make_train_loader(str(shards["train"]), tokenizer, **{**options, **overrides}))


def _words(tokenizer, ids: torch.Tensor) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def test_the_loader_adds_swap_fields_only_when_on_and_changes_nothing_else(synthetic_shards, tokenizer):
    off = _batches(synthetic_shards, tokenizer)
    on = _batches(synthetic_shards, tokenizer, swap_groups=[["circle", "square"]])
    assert set(off[0]) == BATCH_KEYS and set(on[0]) == BATCH_KEYS | SWAP_KEYS
    for plain, swapped in zip(off, on, strict=True):  # the other fields bit for bit as without the feature
        assert plain["keys"] == swapped["keys"]
        for name in BATCH_KEYS - {"keys"}:
            assert torch.equal(plain[name], swapped[name]), name
    valid = torch.cat([b["swap_valid"] for b in on])
    assert valid.dtype == torch.bool and 0 < valid.sum() < len(valid)  # triangles and diamonds alone: nothing to swap
    for batch in on:
        assert batch["swap_input_ids"].shape == batch["input_ids"].shape == batch["swap_attention_mask"].shape
        for row, is_valid in enumerate(batch["swap_valid"].tolist()):
            caption = _words(tokenizer, batch["input_ids"][row])
            negative = _words(tokenizer, batch["swap_input_ids"][row])
            if is_valid:
                assert sorted(_changed_words(caption, negative)[0]) == ["circle", "square"]
                assert len(_changed_words(caption, negative)) == 1
            else:  # no group word, or the swap lies past max_len: the row repeats its caption and takes no part
                assert torch.equal(batch["swap_input_ids"][row], batch["input_ids"][row])
    again = _batches(synthetic_shards, tokenizer, swap_groups=[["circle", "square"]])
    for first, second in zip(on, again, strict=True):
        assert all(torch.equal(first[name], second[name]) for name in SWAP_KEYS)


def test_a_swap_that_truncation_cuts_off_is_not_valid(synthetic_shards, tokenizer):
    # the same samples and swaps at 24 tokens and at 4 ([CLS], three words, [SEP]): most shape words are cut off
    whole = torch.cat([b["swap_valid"] for b in _batches(synthetic_shards, tokenizer, swap_groups=[SHAPES])])
    short = _batches(synthetic_shards, tokenizer, swap_groups=[SHAPES], max_len=5)
    for batch in short:
        same = (batch["swap_input_ids"] == batch["input_ids"]).all(dim=1)
        assert torch.equal(batch["swap_valid"], ~same)
    cut = torch.cat([b["swap_valid"] for b in short])
    assert (cut <= whole).all() and cut.sum() < whole.sum()


def test_a_resumed_loader_draws_the_swaps_an_uninterrupted_one_draws(synthetic_shards, tokenizer):
    options = dict(batch_size=3, rank=0, world_size=1, num_workers=2, seed=7, image_size=32, max_len=24,
                   hflip=True, swap_groups=[SHAPES])
    spec = str(synthetic_shards["train"])
    uninterrupted = list(make_train_loader(spec, tokenizer, **options))
    interrupted = make_train_loader(spec, tokenizer, **options)
    consumed = iter(interrupted)
    for _ in range(5):
        next(consumed)
    resumed = make_train_loader(spec, tokenizer, **options)
    resumed.load_state_dict(interrupted.state_dict())
    rest = list(resumed)
    assert len(rest) == len(uninterrupted) - 5
    for first, second in zip(uninterrupted[5:], rest, strict=True):
        assert first["keys"] == second["keys"]
        assert all(torch.equal(first[name], second[name]) for name in SWAP_KEYS)
