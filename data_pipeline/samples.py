"""Safe reading of shard samples: only image, txt and json members are ever read into a sample.

Anything else in a tar (.pyd, .pkl, .pth, ...) is skipped by name before its bytes are read, so no
member is ever unpickled or loaded. Images are decoded later, under a pixel limit (see images.py).
"""

import contextlib
import hashlib
import json
import random
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import webdataset as wds

from data_pipeline.shard_io import ShardReader, is_remote
from data_pipeline.text import clean_caption

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
READ_EXTENSIONS = frozenset((*IMAGE_EXTENSIONS, "txt", "json"))


@dataclass
class ParsedSample:
    key: str
    image: bytes
    captions: list[str]  # as stored; clean with `cleaned_captions` or pick one with `random_caption`
    meta: dict = field(default_factory=dict)  # the json member (a task's targets, e.g. VQA answers), {} if none


def image_id_of(key: str) -> int:
    """A stable non-negative 63-bit id per sample key (keys are unique across sources: name_split_id)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") >> 1


def read_samples(paths: Iterable[str], skipped: Counter, retries: Counter | None = None) -> Iterator[dict]:
    """Raw samples (key + member bytes) from shards anywhere (shard_io.py); an unreadable shard is counted, not
    fatal. Transient read errors are retried where the read stopped and counted in `retries` ("read_retries").

    webdataset's tar iterator reads the members; grouping them by key is done here rather than by
    `tarfile_samples`, whose generic stages (url opener, expander, group_by_keys with per-member
    regexes and dict copies) cost ~10% of reading a sample (measured); the rest is the standard library's
    tar header parsing. A member name is checked before its bytes are read, so unwanted members never
    become Python objects.
    """
    retries = Counter() if retries is None else retries
    for path in paths:
        yield from _shard_samples(path, skipped, retries)


def _shard_samples(path: str, skipped: Counter, retries: Counter) -> Iterator[dict]:
    sample: dict = {}
    try:
        with ShardReader(path, retries) as stream:
            for member in wds.tariterators.tar_file_iterator(stream, select_files=wanted_member):
                key, extension = wds.tariterators.base_plus_ext(member["fname"])
                if key is None:  # no key before the extension (".jpg"): not a sample member
                    continue
                if key != sample.get("__key__"):
                    if sample:
                        yield sample
                    sample = {"__key__": key}
                if extension.lower() in sample:
                    skipped["duplicate_member"] += 1  # the first one counts
                else:
                    sample[extension.lower()] = member["data"]
    except Exception:  # missing, damaged or failing past its retries: counted once; earlier samples stay valid
        skipped["unreadable_shard"] += 1
    if sample:
        yield sample


def wanted_member(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in READ_EXTENSIONS


def parse_sample(raw: dict, skipped: Counter) -> ParsedSample | None:
    """Image bytes and captions of a raw sample, or None (reason counted) when it has no image or caption.

    Captions come from the json member; the txt member is the fallback when the json is absent or bad. A
    bad json is counted only when it costs the sample (counts are skipped samples: the bad-fraction bound).
    """
    image = next((raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw), None)
    if image is None:
        skipped["missing_image"] += 1
        return None
    captions, bad_json, meta = [], False, {}
    if "json" in raw:
        try:  # UTF-8 only (json.loads of bytes would also guess UTF-16/32); UnicodeDecodeError is a ValueError
            meta = json.loads(raw["json"].decode("utf-8-sig"))
            captions = meta.get("captions") or []
        except (ValueError, AttributeError):
            bad_json, meta = True, {}
    if not captions and "txt" in raw:
        try:  # never a caption with replacement characters: the bytes are not what the writer meant
            captions = [raw["txt"].decode("utf-8")]
        except UnicodeDecodeError:
            skipped["bad_text_encoding"] += 1
            return None
    captions = [c for c in captions if isinstance(c, str) and c.strip()]
    if not captions:
        skipped["bad_json" if bad_json else "no_caption"] += 1
        return None
    return ParsedSample(raw["__key__"].rsplit("/", 1)[-1], image, captions, meta if isinstance(meta, dict) else {})


def cleaned_captions(sample: ParsedSample, max_words: int) -> list[str]:
    return [c for c in (clean_caption(c, max_words) for c in sample.captions) if c]


def random_caption(sample: ParsedSample, rng: random.Random, max_words: int) -> str:
    """One caption at random, cleaned (only the chosen one is cleaned: this runs per sample per epoch)."""
    caption = clean_caption(rng.choice(sample.captions), max_words)
    if caption:
        return caption
    remaining = cleaned_captions(sample, max_words)
    return rng.choice(remaining) if remaining else ""


def caption_pairs(raw: Iterable[dict], max_words: int) -> Iterator[dict]:
    """Each raw sample once per cleaned caption, tagged `__pair__` = (index, caption); a sample without one
    passes untagged, so its processing counts the reason once. Copies share the member bytes."""
    for sample in raw:
        parsed = parse_sample(sample, Counter())  # counted where the sample is processed, not here
        captions = cleaned_captions(parsed, max_words) if parsed is not None else []
        if not captions:
            yield sample
        for index, caption in enumerate(captions):
            yield {**sample, "__pair__": (index, caption)}


def count_pairs(path: str, max_words: int) -> int:
    """(image, caption) pairs in a shard, as caption_pairs yields them (a sample with no caption counts 1, as
    it is skipped once). Reads the tar headers and the caption members only, never an image; a remote shard
    is streamed through (shard_io.py), a local one seeked over."""
    members: dict[str, dict] = {}
    with contextlib.ExitStack() as stack:
        if is_remote(path):
            reader = stack.enter_context(ShardReader(path, Counter()))
            tar = stack.enter_context(tarfile.open(fileobj=reader, mode="r|"))
        else:
            tar = stack.enter_context(tarfile.open(path, "r:"))  # random access: image bytes are seeked over
        for member in tar:
            key, extension = wds.tariterators.base_plus_ext(member.name)
            if key is None or not member.isfile() or not wanted_member(member.name):
                continue
            sample, extension = members.setdefault(key, {"__key__": key}), extension.lower()
            if extension not in sample:  # the first one counts, as in read_samples
                sample[extension] = tar.extractfile(member).read() if extension in ("json", "txt") else b""
    total = 0
    for sample in members.values():
        parsed = parse_sample(sample, Counter())
        total += max(1, len(cleaned_captions(parsed, max_words))) if parsed is not None else 1
    return total
