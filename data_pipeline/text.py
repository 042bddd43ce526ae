"""ALBEF-style caption cleaning (lowercase, punctuation to spaces, whitespace collapsed, words capped) and the
caption edits of augmentation: mirroring, word swaps for hard negatives."""

import random
import re
from collections.abc import Sequence

from data_pipeline.errors import DataError

_PUNCTUATION = re.compile(r"[^\w\s']")
_SPACES = re.compile(r"\s+")
# Python's \w is str.isalnum() (letters and every number) or "_"; the Oniguruma \w of `tokenizers` also
# keeps combining marks and drops other numbers, so the tokenizer's pattern spells the classes out.
_PUNCTUATION_ONIGURUMA = r"[^\p{L}\p{N}_\s']"

MAX_WORDS = 30  # words kept of a caption (ALBEF's pre_caption max_words)


def clean_caption(caption: str, max_words: int = MAX_WORDS) -> str:
    """Return the caption lowercased, without punctuation, single-spaced, at most `max_words` words."""
    text = _PUNCTUATION.sub(" ", caption.lower())
    words = _SPACES.sub(" ", text).strip().split(" ")
    return " ".join(words[:max_words])


def caption_normalizer():
    """`clean_caption` as a `tokenizers` normalizer, for tokenizers used without our loader (an export).

    Whitespace needs no collapsing (the pre-tokenizer splits on any run of it); the word cap is not
    applied, which changes nothing once captions are truncated to max_len <= max_words + 2 tokens.
    """
    from tokenizers import Regex, normalizers

    return normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(Regex(_PUNCTUATION_ONIGURUMA), " ")])


_LEFT_RIGHT = re.compile(r"\b(left|right)\b")


def mirror_caption(caption: str) -> str:
    """The caption of the mirrored image: the words "left" and "right" swapped (whole words of a cleaned,
    lowercase caption; "right" meaning "correct" is swapped too: rare, where a flip without the swap gets
    every left and right wrong)."""
    return _LEFT_RIGHT.sub(lambda word: "right" if word.group(1) == "left" else "left", caption)


def check_swap_groups(groups: Sequence[Sequence[str]]) -> None:
    """Word groups for `swap_word`: each of at least two distinct single lowercase words as cleaned captions
    spell them, no word in two groups. Raises DataError naming the first problem."""
    group_of: dict[str, int] = {}
    for index, group in enumerate(groups):
        words = list(group)
        if len(set(words)) != len(words) or len(words) < 2:
            problem = "repeats a word" if len(words) >= 2 else "needs at least two words"
            raise DataError(f"swap group {words} {problem}: give each group two or more distinct words in "
                            "data.swap_negatives")
        for word in words:
            if not isinstance(word, str) or not word or clean_caption(word) != word or " " in word:
                raise DataError(f"swap word {word!r} is not a single lowercase word without punctuation (as cleaned "
                                "captions spell it): fix data.swap_negatives")
            if group_of.setdefault(word, index) != index:
                raise DataError(f"swap word {word!r} is in two groups: keep it in one of data.swap_negatives")


def swap_word(caption: str, groups: Sequence[Sequence[str]], rng: random.Random) -> str | None:
    """A hard-negative caption (NegCLIP): one occurrence of a group's word, drawn uniformly, replaced by another
    word of its group, drawn uniformly; None when the (cleaned) caption holds no group word."""
    group_of = {word: group for group in groups for word in group}
    words = caption.split(" ")
    places = [index for index, word in enumerate(words) if word in group_of]
    if not places:
        return None
    place = rng.choice(places)
    words[place] = rng.choice([word for word in group_of[words[place]] if word != words[place]])
    return " ".join(words)
