"""Shard specs -> a checked ShardSet, without touching torch.distributed.

A spec is a directory holding manifest.json, a brace pattern (`dir/train-{000000..000009}.tar`), a glob,
a `::`-separated list, or several of these as weighted sources: `"dirA::0.7,dirB::0.3"` (commas outside
braces separate sources; a trailing `::NUMBER` is the source's weight) or a list of strings or
(spec, weight) pairs. Weights only apply in resampled mode.
"""

import glob
import tarfile
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.errors import DataError
from data_pipeline.manifest import MANIFEST, read_manifest

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
        import webdataset as wds

        urls = []
        for url in wds.shardlists.expand_urls(part):
            urls.extend(sorted(glob.glob(url)) if any(c in url for c in "*?[") else [url])
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
