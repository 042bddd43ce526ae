"""Shard specs -> a checked ShardSet, without touching torch.distributed.

A spec is a directory holding manifest.json, a brace pattern (`dir/train-{000000..000009}.tar`), a glob,
a `::`-separated list, or several of these as weighted sources: `"dirA::0.7,dirB::0.3"` (commas outside
braces separate sources; a trailing `::NUMBER` is the source's weight) or a list of strings or
(spec, weight) pairs. Weights only apply in resampled mode.

Each of these may also be remote (shard_io.py): an http(s) or fsspec URL (`s3://`, `gs://`) of a directory
holding manifest.json or of shards (brace patterns; globs where fsspec can list), or a `pipe:` command per
shard (`pipe:aws s3 cp s3://b/train-{0000..0099}.tar -`). Remote shards are counted from the manifest.json
beside them; epoch mode needs those counts, resampled mode does not. A remote shard is not probed here: one
that cannot be read is skipped and counted by the loader.
"""

import glob
import tarfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.errors import DataError
from data_pipeline.manifest import MANIFEST, read_manifest
from data_pipeline.shard_io import is_remote, join, parent

MODES = ("epoch", "resampled")


@dataclass(frozen=True)
class Shard:
    path: str
    num_samples: int


@dataclass(frozen=True)
class ShardSource:
    spec: str
    weight: float
    shards: tuple[Shard, ...]
    counted: bool = True  # False: remote shards without a manifest (num_samples 0), resampled mode only


@dataclass(frozen=True)
class ShardSet:
    sources: tuple[ShardSource, ...]

    @property
    def shards(self) -> list[Shard]:
        return [shard for source in self.sources for shard in source.shards]

    @property
    def num_samples(self) -> int:
        return sum(shard.num_samples for shard in self.shards)


def check_shards(spec, *, world_size: int, num_workers: int, mode: str = "epoch") -> ShardSet:
    """Resolve `spec` and check it can feed world_size x num_workers readers; DataError otherwise."""
    if mode not in MODES:
        raise DataError(f"loader mode {mode!r} is not one of {MODES}; fix the data mode option")
    shard_set = resolve_shards(spec)
    if mode == "epoch":
        if any(source.weight != 1.0 for source in shard_set.sources):
            raise DataError("source weights only apply in mode='resampled'; drop the ::WEIGHT suffixes or switch mode")
        uncounted = next((source for source in shard_set.sources if not source.counted), None)
        if uncounted is not None:
            raise DataError(_no_counts_message(uncounted.spec))
        readers = world_size * max(1, num_workers)
        if len(shard_set.shards) < readers:
            raise DataError(
                f"{len(shard_set.shards)} shards cannot feed {world_size} ranks x {max(1, num_workers)} workers "
                f"in epoch mode; write at least that many shards (make shards MIN_SHARDS={readers}), use fewer "
                f"workers, or mode='resampled'"
            )
    return shard_set


def resolve_shards(spec) -> ShardSet:
    if isinstance(spec, ShardSet):
        return spec
    return ShardSet(tuple(_resolve_source(part, weight) for part, weight in _split_spec(spec)))


def _split_spec(spec) -> list[tuple[str, float]]:
    if isinstance(spec, (str, Path)):
        parts, depth, current = [], 0, ""
        for char in str(spec):
            depth += {"{": 1, "}": -1}.get(char, 0)
            if char == "," and depth == 0:
                parts.append(current)
                current = ""
            else:
                current += char
        items = [*parts, current]
    elif isinstance(spec, (list, tuple)) and spec:
        items = list(spec)
    else:
        raise DataError(f"shard spec {spec!r} is empty; give a directory, pattern or list of shards")
    result = []
    for item in items:
        if isinstance(item, (list, tuple)):
            result.append((str(item[0]), float(item[1])))
            continue
        head, _, tail = str(item).strip().rpartition("::")
        try:
            result.append((head, float(tail)) if head else (str(item).strip(), 1.0))
        except ValueError:
            result.append((str(item).strip(), 1.0))
    for part, weight in result:
        if not part or weight <= 0:
            raise DataError(f"bad shard source {part!r} with weight {weight} in {spec!r}; fix the spec")
    return result


def _resolve_source(part: str, weight: float) -> ShardSource:
    if is_remote(part):
        shards, counted = _remote_shards(part)
        if not shards:
            raise DataError(f"shard source {part!r} holds no shards; check the URL or its {MANIFEST}")
        return ShardSource(part, weight, shards, counted)
    path = Path(part)
    if path.is_dir():
        manifest = read_manifest(path)
        if manifest is None:
            raise DataError(f"{path} has no {MANIFEST}; run make_shards into it or give a shard pattern")
        shards = tuple(Shard(str(path / e["name"]), e["num_samples"]) for e in manifest["shards"])
        missing = [s.path for s in shards if not Path(s.path).is_file()]
        if missing:
            raise DataError(
                f"{len(missing)} shards of {path / MANIFEST} are missing (e.g. {missing[0]}); rerun make_shards"
            )
    else:
        urls = shard_urls(part)
        if not urls:
            raise DataError(f"shard pattern {part!r} matches no file; check the path")
        missing = [url for url in urls if not Path(url).is_file()]
        if missing:
            raise DataError(
                f"{len(missing)} of {len(urls)} shards in {part!r} are missing (e.g. {missing[0]}); "
                f"check the spec or rerun make_shards"
            )
        shards = tuple(Shard(url, _count_samples(Path(url))) for url in urls)
    if not shards:
        raise DataError(f"shard source {part!r} holds no shards; rerun make_shards")
    return ShardSource(part, weight, shards)


def _count_samples(path: Path) -> int:
    """From the sibling manifest when it lists this shard; otherwise by reading the tar's member names."""
    manifest = read_manifest(path.parent)
    if manifest is not None:
        for entry in manifest["shards"]:
            if entry["name"] == path.name:
                return entry["num_samples"]
    try:
        with tarfile.open(path) as tar:
            return len({Path(name).name.split(".", 1)[0] for name in tar.getnames() if "." in Path(name).name})
    except tarfile.TarError as exc:
        raise DataError(f"{path} is not a readable tar file ({exc}); rerun make_shards") from exc


def _remote_shards(part: str) -> tuple[tuple[Shard, ...], bool]:
    """The shards of a remote source and whether a manifest counted all of them."""
    import webdataset as wds

    try:
        if part.startswith("pipe:"):
            return tuple(Shard(command, 0) for command in wds.shardlists.expand_urls(part)), False
        if not _names_shards(part):  # a directory: its manifest lists the shards
            manifest = read_manifest(part)
            if manifest is None:
                raise DataError(
                    f"{part} has no {MANIFEST}; write one with `python -m data_pipeline.index_shards {part}` "
                    f"(it reads the shards, rewrites nothing) or give a shard pattern"
                )
            return tuple(Shard(join(part, e["name"]), e["num_samples"]) for e in manifest["shards"]), True
        urls = shard_urls(part)
        counts = {}
        for directory in dict.fromkeys(parent(url) for url in urls):
            manifest = read_manifest(directory) or {"shards": []}
            counts |= {join(directory, entry["name"]): entry["num_samples"] for entry in manifest["shards"]}
        return tuple(Shard(url, counts.get(url, 0)) for url in urls), all(url in counts for url in urls)
    except DataError:
        raise
    except (OSError, ImportError, ValueError, KeyError) as exc:  # network, missing fsspec backend, bad manifest
        raise DataError(
            f"cannot read shard source {part!r}: {exc}; check the URL and network (s3:// needs s3fs, gs:// gcsfs)"
        ) from None


def shard_urls(pattern: str) -> list[str]:
    """A brace pattern expanded and its globs listed (local, or remote through fsspec; http has no listing)."""
    import webdataset as wds

    urls = []
    for url in wds.shardlists.expand_urls(pattern):
        if is_remote(url):
            urls.extend(_listed(url))
        else:
            urls.extend(sorted(glob.glob(url)) if any(c in url for c in "*?[") else [url])
    return urls


def _names_shards(url: str) -> bool:
    """A URL naming shards (a pattern or a .tar) rather than a directory that holds a manifest."""
    path = urllib.parse.urlparse(url).path
    return "{" in url or any(c in path for c in "*?[") or path.endswith((".tar", ".tgz", ".tar.gz"))


def _listed(url: str) -> list[str]:
    """A remote glob expanded by its fsspec filesystem; any other URL as it is (http has no listing)."""
    path = urllib.parse.urlparse(url).path
    if url.startswith(("http://", "https://", "pipe:")) or not any(c in path for c in "*?["):
        return [url]
    import fsspec

    filesystem, pattern = fsspec.core.url_to_fs(url)
    found = sorted(filesystem.glob(pattern))
    if not found:
        raise DataError(f"shard pattern {url!r} matches no shard; check the URL")
    return [filesystem.unstrip_protocol(name) for name in found]


def _no_counts_message(spec: str) -> str:
    if spec.startswith("pipe:"):
        return (
            f"epoch mode needs each shard's sample count, and `pipe:` shards have no {MANIFEST} to give it "
            f"({spec[:60]!r}); name the shards by URL with a manifest beside them, or use mode='resampled'"
        )
    return (
        f"epoch mode needs each shard's sample count from a {MANIFEST} beside the shards, and {spec!r} has none "
        f"listing them all; write one with `python -m data_pipeline.index_shards {spec}` (it reads the shards, "
        f"rewrites nothing) or use mode='resampled'"
    )
