"""Dataset layouts. Each reader returns, per image, a stable id, the image (path or bytes) and its captions.

Caption-level problems (empty, not UTF-8, duplicate ids, lines or annotations that belong to no image)
are counted here; image problems are found when the shard writer decodes the image.

Sources without split information (the plain Flickr30k caption files, a single saved HF Dataset) are split
by `hash_split`: each image id falls in one split by its hash, so train, val and test never share an image
whichever splits a run asks for.
"""

import hashlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from data_pipeline.errors import DataError


@dataclass(frozen=True)
class Record:
    image_id: str  # the sample's id (a VQA question's id: one sample per question)
    image: str | bytes  # a file path, or the encoded image itself
    captions: tuple[str, ...]
    extra: dict = field(default_factory=dict, hash=False)  # more fields for the sample's json (VQA answers)


@dataclass
class SourceSplit:
    records: list[Record]
    skipped: Counter = field(default_factory=Counter)
    split_rule: dict | None = None  # how the split was cut from a source without splits (goes to the manifest)


HASH_SPLITS = ("train", "val", "test")
DEFAULT_HOLDOUT_FRACTION = 0.05


def hash_split_rule(fraction: float) -> dict:
    """The [low, high) ranges of the id hash per split: val and test `fraction` each, train the rest."""
    return {
        "by": "sha256(image_id) / 2**256",
        "val": [0.0, fraction],
        "test": [fraction, 2 * fraction],
        "train": [2 * fraction, 1.0],
    }


def in_hash_split(image_id: object, split: str, fraction: float) -> bool:
    """Whether `image_id` belongs to `split` under hash_split_rule (which does not depend on the splits asked)."""
    low, high = hash_split_rule(fraction)[split]
    return low <= int.from_bytes(hashlib.sha256(str(image_id).encode()).digest(), "big") / 2**256 < high


def check_hash_split(split: str, source_name: str) -> None:
    if split not in HASH_SPLITS:
        raise DataError(
            f"{source_name} has no split information, so its splits are {', '.join(HASH_SPLITS)} cut by "
            f"image-id hash, not {split!r}; fix --splits"
        )


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
