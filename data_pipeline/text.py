"""ALBEF-style caption cleaning: lowercase, punctuation to spaces, whitespace collapsed, words capped."""

import re

_PUNCTUATION = re.compile(r"[^\w\s']")
_SPACES = re.compile(r"\s+")


def clean_caption(caption: str, max_words: int = 30) -> str:
    """Return the caption lowercased, without punctuation, single-spaced, at most `max_words` words."""
    text = _PUNCTUATION.sub(" ", caption.lower())
    words = _SPACES.sub(" ", text).strip().split(" ")
    return " ".join(words[:max_words])
