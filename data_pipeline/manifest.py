"""manifest.json: the record of a split directory's shards, written last and atomically."""

import hashlib
import json
import os
from pathlib import Path

from data_pipeline.shard_io import is_remote, join, read_bytes

MANIFEST = "manifest.json"
PROGRESS = ".progress.json"  # shards finished so far by an unfinished run; lets a rerun resume
# per-caption (or per-line) reasons; every other reason counts one skipped image
CAPTION_REASONS = frozenset(
    {"empty_caption", "non_utf8_caption", "non_text_caption", "caption_without_image", "unparseable_line"}
)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: str | Path, data: dict) -> None:
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(temporary, path)


def read_manifest(directory: str | Path) -> dict | None:
    """The manifest of a local directory or of a remote one (any shard_io location), None when it has none."""
    if isinstance(directory, str) and is_remote(directory):
        try:
            return json.loads(read_bytes(join(directory, MANIFEST)))
        except FileNotFoundError:
            return None
    path = Path(directory) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def shard_is_complete(directory: Path, entry: dict) -> bool:
    """The manifest proves a shard complete when a file of that name has the recorded size and sha256."""
    path = directory / entry["name"]
    return path.is_file() and path.stat().st_size == entry["bytes"] and file_sha256(path) == entry["sha256"]


def bad_image_count(skipped: dict[str, int]) -> int:
    return sum(n for reason, n in skipped.items() if reason not in CAPTION_REASONS)
