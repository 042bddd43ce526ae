"""Write manifest.json for shards someone else wrote (img2dataset output, for one), without rewriting them.

    python -m data_pipeline.index_shards data/laion/shards                       # a local directory of *.tar
    python -m data_pipeline.index_shards s3://bucket/laion/shards                # fsspec lists *.tar there
    python -m data_pipeline.index_shards 'https://host/laion/{00000..00099}.tar' --out manifest.json

Each shard is read once, as the loader reads it (shard_io.py: retries included), to count its samples
(keys with an image, txt or json member), its bytes and its sha256. The manifest goes beside the shards:
written atomically in a local directory, as one object through fsspec (s3://, gs://); http cannot be
written, so there `--out` names a local file to upload beside the shards. A shard that cannot be read is
left out of the manifest and named on stderr; the loader then never reads it.
"""

import argparse
import hashlib
import json
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from data_pipeline.errors import DataError
from data_pipeline.manifest import MANIFEST, write_json_atomic
from data_pipeline.samples import wanted_member
from data_pipeline.shard_io import ShardReader, is_remote, join, parent
from data_pipeline.shards import shard_urls

SHARD_SUFFIXES = (".tar", ".tgz", ".tar.gz")


def shard_locations(location: str) -> list[str]:
    """The shards of a directory (local, or listable through fsspec) or of a brace pattern / glob."""
    if not is_remote(location) and Path(location).is_dir():
        return sorted(str(p) for p in Path(location).iterdir() if p.name.endswith(SHARD_SUFFIXES))
    if "{" in location or location.endswith(SHARD_SUFFIXES) or any(c in location for c in "*?["):
        return shard_urls(location)
    if location.startswith(("http://", "https://", "pipe:")):
        raise DataError(f"{location} cannot be listed; name its shards with a brace pattern (.../{{00000..00099}}.tar)")
    import fsspec

    filesystem, path = fsspec.core.url_to_fs(location)
    names = sorted(name for name in filesystem.ls(path, detail=False) if name.endswith(SHARD_SUFFIXES))
    return [filesystem.unstrip_protocol(name) for name in names]


class _Hashing:
    """Passes a reader's bytes through, hashing and counting them."""

    def __init__(self, reader: ShardReader):
        self.reader, self.sha256, self.bytes = reader, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.reader.read(size)
        self.sha256.update(data)
        self.bytes += len(data)
        return data


def index_shard(location: str) -> dict:
    """One manifest entry: name, samples, bytes, sha256; with "error" instead when the shard is unreadable.

    Samples are counted as read_samples groups them (consecutive members of one key, wanted members only).
    """
    import webdataset as wds

    name = location.rstrip("/").rsplit("/", 1)[-1]
    retries: Counter = Counter()
    samples, key = 0, None
    try:
        with ShardReader(location, retries) as reader:
            hashing = _Hashing(reader)
            for member in wds.tariterators.tar_file_iterator(hashing, select_files=wanted_member):
                member_key, _ = wds.tariterators.base_plus_ext(member["fname"])
                if member_key is not None and member_key != key:
                    samples, key = samples + 1, member_key
            while hashing.read(1 << 20):  # what tar leaves after the end marker: the digest covers the whole file
                pass
    except Exception as exc:
        return {"name": name, "error": str(exc)}
    return {"name": name, "num_samples": samples, "bytes": hashing.bytes, "sha256": hashing.sha256.hexdigest(),
            "read_retries": retries["read_retries"]}  # fmt: skip


def build_manifest(shards: list[str], workers: int) -> dict:
    directories = set(parent(shard) for shard in shards)
    if len(directories) != 1:
        raise DataError(f"shards from {len(directories)} directories; index each directory on its own")
    with ThreadPoolExecutor(max(1, workers)) as pool:
        entries = list(tqdm(pool.map(index_shard, shards), total=len(shards), desc="index", unit="shard"))
    good = [entry for entry in entries if "error" not in entry]
    for entry in entries:
        if "error" in entry:
            print(f"warning: left out unreadable shard {entry['name']}: {entry['error']}", file=sys.stderr)
    return {
        "shards": [{k: entry[k] for k in ("name", "num_samples", "bytes", "sha256")} for entry in good],
        "num_shards": len(good),
        "num_samples": sum(entry["num_samples"] for entry in good),
        "bytes": sum(entry["bytes"] for entry in good),
        "options": {"format": 1, "indexed_by": "data_pipeline.index_shards", "source": directories.pop()},
        "skipped": {"unreadable_shard": len(entries) - len(good)} if len(good) < len(entries) else {},
        "unreadable_shards": [entry["name"] for entry in entries if "error" in entry],
        "read_retries": sum(entry.get("read_retries", 0) for entry in entries),
    }


def write_manifest(manifest: dict, directory: str, out: str | None) -> str:
    target = out or join(directory, MANIFEST)
    if not is_remote(target):
        write_json_atomic(target, manifest)
        return target
    if target.startswith(("http://", "https://", "pipe:")):
        raise DataError(f"{target} cannot be written; pass --out manifest.json and upload it beside the shards")
    import fsspec

    with fsspec.open(target, "w") as f:  # one object put: readers see all of it or none
        f.write(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("location", help="a directory, fsspec URL of one, or a brace pattern of shard URLs")
    parser.add_argument("--out", help=f"where to write the manifest (default: {MANIFEST} beside the shards)")
    parser.add_argument("--workers", type=int, default=8, help="shards read at once (threads: reads are I/O)")
    args = parser.parse_args(argv)
    try:
        shards = shard_locations(args.location)
        if not shards:
            raise DataError(f"{args.location} holds no {'/'.join(SHARD_SUFFIXES)} files; check the location")
        manifest = build_manifest(shards, args.workers)
        if not manifest["shards"]:
            raise DataError(f"none of the {len(shards)} shards of {args.location} could be read; check them")
        target = write_manifest(manifest, parent(shards[0]), args.out)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{target}: {manifest['num_shards']} shards, {manifest['num_samples']} samples, {manifest['bytes']} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
