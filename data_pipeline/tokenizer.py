"""Load a Hugging Face tokenizer by name or local path, with a clear error instead of a hub traceback, and
measure how well it fits a sample of captions."""

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.errors import DataError
from data_pipeline.samples import cleaned_captions, parse_sample, read_samples
from data_pipeline.shards import resolve_shards


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as exc:
        hint = "run `make tokenizer`" if not Path(name_or_path).exists() else "re-create it with `make tokenizer`"
        raise DataError(f"cannot load tokenizer {name_or_path!r} ({type(exc).__name__}); {hint}") from exc
    for token in ("pad_token", "cls_token", "sep_token", "mask_token"):
        if getattr(tokenizer, token) is None:
            raise DataError(f"tokenizer {name_or_path!r} has no {token}; use a BERT-style WordPiece tokenizer")
    return tokenizer


@dataclass
class TokenizerFit:
    """How a tokenizer cuts a sample of cleaned captions: a tokenizer trained on other text cuts most words
    into pieces (the 168-token synthetic one reads "young" as `y ##o ##u ##ng`) or reads them as [UNK]."""

    words: int
    split_words: int  # words cut into more than one token
    tokens: int
    unknown_tokens: int

    @property
    def split_fraction(self) -> float:
        return self.split_words / max(self.words, 1)

    @property
    def unknown_fraction(self) -> float:
        return self.unknown_tokens / max(self.tokens, 1)


def tokenizer_fit(tokenizer, captions: Iterable[str]) -> TokenizerFit:
    words = [word for caption in captions for word in caption.split()]
    pieces = tokenizer(words, add_special_tokens=False)["input_ids"] if words else []
    return TokenizerFit(
        words=len(words),
        split_words=sum(len(ids) > 1 for ids in pieces),
        tokens=sum(len(ids) for ids in pieces),
        unknown_tokens=sum(ids.count(tokenizer.unk_token_id) for ids in pieces),
    )


def caption_sample(spec: str, count: int, max_words: int = 30) -> list[str]:
    """The first `count` cleaned captions of the shards, read as the loader reads them (a damaged shard or
    sample is passed over, not fatal)."""
    captions: list[str] = []
    skipped: Counter = Counter()
    for raw in read_samples((shard.path for shard in resolve_shards(spec).shards), skipped):
        parsed = parse_sample(raw, skipped)
        captions += cleaned_captions(parsed, max_words) if parsed is not None else []
        if len(captions) >= count:
            break
    return captions[:count]
