"""Load a Hugging Face tokenizer by name or local path, with a clear error instead of a hub traceback."""

from pathlib import Path

from data_pipeline.errors import DataError


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
