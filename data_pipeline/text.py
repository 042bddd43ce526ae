"""ALBEF-style caption cleaning: lowercase, punctuation to spaces, whitespace collapsed, words capped."""

import re

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
