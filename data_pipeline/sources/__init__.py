"""Dataset layouts. Each reader returns, per image, a stable id, the image (path or bytes) and its captions.

Caption-level problems (empty, not UTF-8, duplicate ids) are counted here; image problems are found
when the shard writer decodes the image.
"""

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Record:
    image_id: str
    image: str | bytes  # a file path, or the encoded image itself
    captions: tuple[str, ...]


@dataclass
class SourceSplit:
    records: list[Record]
    skipped: Counter = field(default_factory=Counter)


def _valid_caption(caption: str | bytes, skipped: Counter) -> str | None:
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError:
            skipped["non_utf8_caption"] += 1
            return None
    if not isinstance(caption, str):
        skipped["non_text_caption"] += 1
        return None
    try:
        caption.encode("utf-8")  # lone surrogates (e.g. "\udc80" escapes in JSON) are not UTF-8
    except UnicodeEncodeError:
        skipped["non_utf8_caption"] += 1
        return None
    caption = caption.strip()
    if not caption:
        skipped["empty_caption"] += 1
        return None
    return caption


def collect(items: Iterable[tuple[object, str | bytes, Iterable[str | bytes]]]) -> SourceSplit:
    """Validate (image_id, image, captions) triples: first occurrence of an id wins, bad captions dropped."""
    split = SourceSplit(records=[])
    seen: set[str] = set()
    for image_id, image, captions in items:
        image_id = str(image_id)
        if image_id in seen:
            split.skipped["duplicate_id"] += 1
            continue
        seen.add(image_id)
        valid = [c for c in (_valid_caption(c, split.skipped) for c in captions) if c is not None]
        if not valid:
            split.skipped["no_caption"] += 1
            continue
        split.records.append(Record(image_id, image, tuple(valid)))
    return split
