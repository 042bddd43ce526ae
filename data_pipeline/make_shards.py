"""Turn a dataset into WebDataset shards, one directory per split, each with a manifest.json.

    python -m data_pipeline.make_shards --source coco --root data/synthetic_coco --name synthetic

Every sample is KEY.jpg + KEY.txt (first caption) + KEY.json (all captions and provenance). Records are
shuffled once (by --seed) before sharding; shards close at --shard-samples or --shard-bytes, and hold
fewer samples when that is what it takes for a split to have --min-shards shards (so small splits still
feed several ranks x workers). Every requested split is read and checked before any is written. A rerun
keeps every shard the manifest (or the progress file of an interrupted run) proves complete, and
redoes the rest. Bad inputs are skipped and counted by reason; the run fails only when no valid sample
is left or the skipped fraction exceeds --max-bad-fraction.
"""

import argparse
import hashlib
import json
import os
import random
import re
import sys
from collections import Counter
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from data_pipeline.errors import DataError
from data_pipeline.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, ImageRejected, prepare_for_shard
from data_pipeline.manifest import (
    MANIFEST,
    PROGRESS,
    bad_image_count,
    file_sha256,
    read_manifest,
    shard_is_complete,
    write_json_atomic,
)
from data_pipeline.sources import DEFAULT_HOLDOUT_FRACTION, Record, SourceSplit

SOURCES = ("coco", "flickr30k", "hf", "vqa")
FORMAT_VERSION = 1
DEFAULT_SHARD_SAMPLES = 500
DEFAULT_MIN_SHARDS = 8  # 2 ranks x 4 workers, or 8 single-worker GPUs, from a split of any size
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def read_source(args: argparse.Namespace, split: str) -> SourceSplit:
    if args.source == "coco":
        if args.karpathy_json:
            from data_pipeline.sources.karpathy import read_karpathy

            return read_karpathy(args.karpathy_json, args.root, split)
        from data_pipeline.sources.coco import read_coco

        return read_coco(args.root, split)
    if args.source == "flickr30k":
        from data_pipeline.sources.flickr30k import read_flickr30k

        return read_flickr30k(args.root, split, args.karpathy_json, holdout_fraction=args.holdout_fraction)
    if args.source == "vqa":
        from data_pipeline.sources.vqa import read_vqa

        return read_vqa(args.root, split)
    from data_pipeline.sources.hf import read_hf

    return read_hf(
        args.hf_dataset,
        split,
        image_column=args.image_column,
        caption_column=args.caption_column,
        id_column=args.id_column,
        holdout_fraction=args.holdout_fraction,
    )


def sample_key(name: str, split: str, image_id: str) -> str:
    """Keys have no dots (WebDataset splits member names at the first dot)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{name}_{split}_{image_id}")


def _prepare(record: Record, *, max_size: int, max_pixels: int, min_side: int, quality: int):
    """Runs in a worker process: the image bytes ready to store, or the reason to skip the record."""
    try:
        if isinstance(record.image, bytes):
            data = record.image
        else:
            try:
                data = Path(record.image).read_bytes()
            except OSError:
                return record, "missing_image"
        return record, prepare_for_shard(
            data, max_size=max_size, max_pixels=max_pixels, min_side=min_side, quality=quality
        )
    except ImageRejected as rejected:
        return record, rejected.reason


def _sample(record: Record, image, *, name: str, split: str) -> dict:
    image_id = int(record.image_id) if record.image_id.isdigit() else record.image_id
    meta = {
        "image_id": image_id,
        "captions": list(record.captions),
        "source": name,
        "split": split,
        "width": image.width,
        "height": image.height,
        "original_size": [image.original_width, image.original_height],
        "sha256": image.sha256,
        **record.extra,  # a VQA question's answers, and the id of its image (the record's id is the question's)
    }
    key = sample_key(name, split, record.image_id)
    return {"__key__": key, "jpg": image.jpeg, "txt": record.captions[0], "json": json.dumps(meta)}


def _fingerprint(records: list[Record]) -> str:
    digest = hashlib.sha256()
    for record in records:
        image = record.image if isinstance(record.image, str) else hashlib.sha256(record.image).hexdigest()
        digest.update(json.dumps([record.image_id, image, record.captions, record.extra], sort_keys=True).encode())
    return digest.hexdigest()


def _reusable_shards(directory: Path, options: dict) -> list[dict]:
    """The leading shards a previous run with the same options provably finished."""
    previous = read_manifest(directory)
    if previous is None and (directory / PROGRESS).is_file():
        previous = json.loads((directory / PROGRESS).read_text())
    if previous is None or previous.get("options") != options:
        return []
    kept = []
    for entry in previous["shards"]:
        if not shard_is_complete(directory, entry):
            break
        kept.append(entry)
    return kept


def shard_split(args: argparse.Namespace, split: str, source: SourceSplit) -> tuple[dict, str]:
    """Write (or complete) one split directory from its records; returns its manifest and skip summary."""
    records = source.records
    random.Random(f"{args.seed}-{split}").shuffle(records)
    directory = Path(args.out) / split
    directory.mkdir(parents=True, exist_ok=True)
    options = {
        "format": FORMAT_VERSION,
        "source": args.source,
        "name": args.name,
        "root": str(args.root or args.hf_dataset),
        "karpathy_json": args.karpathy_json,
        "split": split,
        "seed": args.seed,
        "max_size": args.max_size,
        "max_pixels": args.max_pixels,
        "min_side": args.min_side,
        "jpeg_quality": args.jpeg_quality,
        "shard_samples": args.shard_samples,
        "min_shards": args.min_shards,
        "shard_bytes": args.shard_bytes,
        "split_rule": source.split_rule,  # how a source without splits was cut (None: the source's own splits)
        "num_inputs": len(records),
        "inputs_sha256": _fingerprint(records),  # reuse shards only if they came from these very records
    }
    shards = _reusable_shards(directory, options)
    start = shards[-1]["end_input"] if shards else 0
    _write_shards(args, split, directory, records, start, shards, options)

    skipped = Counter(source.skipped)
    for entry in shards:
        skipped.update(entry["skipped"])
    expected = {entry["name"] for entry in shards}
    for stale in directory.glob(f"{split}-*.tar*"):
        if stale.name not in expected:
            stale.unlink()
    manifest = {
        "options": options,
        "shards": shards,
        "num_shards": len(shards),
        "num_samples": sum(entry["num_samples"] for entry in shards),
        "bytes": sum(entry["bytes"] for entry in shards),
        "skipped": dict(sorted(skipped.items())),
    }
    summary = ", ".join(f"{reason}={n}" for reason, n in manifest["skipped"].items()) or "nothing"
    example = missing_example(records, args.root) if skipped["missing_image"] else ""
    summary += f"; {example}" if example else ""
    _check_enough_valid(manifest, split, len(records) + bad_image_count(source.skipped), args.max_bad_fraction, summary)
    write_json_atomic(directory / MANIFEST, manifest)
    (directory / PROGRESS).unlink(missing_ok=True)
    return manifest, summary


def samples_per_shard(num_inputs: int, shard_samples: int, min_shards: int) -> int:
    """--shard-samples, or fewer so that `num_inputs` fill at least `min_shards` shards."""
    return max(1, min(shard_samples, num_inputs // min_shards))


def _write_shards(args, split, directory, records, start, shards, options) -> None:
    prepare = partial(
        _prepare, max_size=args.max_size, max_pixels=args.max_pixels, min_side=args.min_side, quality=args.jpeg_quality
    )
    per_shard = samples_per_shard(len(records), args.shard_samples, args.min_shards)
    writer, entry = None, None

    def close_shard(end_input: int) -> None:
        writer.close()
        temporary = directory / (entry["name"] + ".tmp")
        os.replace(temporary, directory / entry["name"])  # a shard appears under its name only when whole
        path = directory / entry["name"]
        entry.update(bytes=path.stat().st_size, sha256=file_sha256(path), end_input=end_input)
        entry["skipped"] = dict(sorted(entry["skipped"].items()))
        shards.append(entry)
        write_json_atomic(directory / PROGRESS, {"options": options, "shards": shards})

    with Pool(max(1, args.workers)) as pool:
        results = pool.imap(prepare, records[start:], chunksize=16)
        bar = tqdm(results, total=len(records) - start, desc=f"{split} shards", unit="img", disable=args.quiet)
        for position, (record, image) in enumerate(bar, start=start):
            if writer is None:
                name = f"{split}-{len(shards):06d}.tar"
                entry = {"name": name, "num_samples": 0, "first_input": position, "skipped": Counter()}
                writer = wds.TarWriter(str(directory / (name + ".tmp")), mtime=0)
                shard_bytes = 0
            if isinstance(image, str):
                entry["skipped"][image] += 1
            else:
                shard_bytes += writer.write(_sample(record, image, name=args.name, split=split))
                entry["num_samples"] += 1
            if entry["num_samples"] >= per_shard or shard_bytes >= args.shard_bytes:
                close_shard(position + 1)
                writer = None
        if writer is not None:
            close_shard(len(records))


def missing_example(records: list[Record], root: str | None) -> str:
    """One image path the source names that does not exist, and one image file under `root` that does."""
    missing = next((r.image for r in records if isinstance(r.image, str) and not os.path.exists(r.image)), None)
    if missing is None:
        return ""
    existing = None
    if root:  # the first image file at most three levels down: enough to show the layout on disk
        for pattern in ("*", "*/*", "*/*/*"):  # the first by name, so the message is the same on every run
            existing = min((p for p in Path(root).glob(pattern) if p.suffix.lower() in IMAGE_SUFFIXES), default=None)
            if existing is not None:
                break
    found = f"{existing} exists" if existing else f"no image file exists under {root}"
    return f"e.g. {missing} is missing; {found}"


def _check_enough_valid(
    manifest: dict, split: str, num_inputs: int, max_bad_fraction: float | None, summary: str
) -> None:
    skipped = manifest["skipped"]
    if manifest["num_samples"] == 0:
        raise DataError(f"no valid sample in split {split!r} (skipped: {summary}); check --root and the layout")
    bad_fraction = bad_image_count(skipped) / max(1, num_inputs)
    if max_bad_fraction is not None and bad_fraction > max_bad_fraction:
        raise DataError(
            f"split {split!r}: {bad_fraction:.1%} of images skipped ({summary}) > --max-bad-fraction "
            f"{max_bad_fraction}; fix the data or raise the bound"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--source",
        choices=SOURCES,
        default="coco",
        help="dataset layout (synthetic data is coco) (default: %(default)s)",
    )
    parser.add_argument(
        "--root",
        help="dataset directory (coco: annotations/ + {train,val}2017/ or 2014/; flickr30k: "
        "flickr30k-images/ or flickr30k_images/ + results.csv or results_20130124.token)",
    )
    parser.add_argument(
        "--karpathy-json",
        help="Karpathy split file (dataset_coco.json / dataset_flickr30k.json); "
        "for coco, images are found at ROOT/filepath/filename (2014 names) or ROOT/{train,val}2017/ID.jpg",
    )
    parser.add_argument("--hf-dataset", help="hf: a Hugging Face dataset name or a save_to_disk directory")
    parser.add_argument(
        "--image-column", default="image", help="hf: image column (Image feature, bytes or path) (default: %(default)s)"
    )
    parser.add_argument(
        "--caption-column", default="caption", help="hf: caption column (a string or a list) (default: %(default)s)"
    )
    parser.add_argument("--id-column", help="hf: image id column (default: the row index)")
    parser.add_argument(
        "--splits",
        default="train,val",
        help="comma-separated splits to shard (hf: val also finds validation) (default: %(default)s)",
    )
    parser.add_argument(
        "--holdout-fraction",
        type=float,
        default=DEFAULT_HOLDOUT_FRACTION,
        help="sources without splits (plain Flickr30k caption files, one saved HF Dataset): val and test each "
        "take this fraction of the images by image-id hash, train the rest (default: %(default)s)",
    )
    parser.add_argument("--name", help="dataset name: key prefix and default output folder (default: --source)")
    parser.add_argument("--out", help="output directory; one subdirectory per split (default: data/shards/NAME)")
    parser.add_argument(
        "--max-size", type=int, default=256, help="shorter image side at most this (pixels) (default: %(default)s)"
    )
    parser.add_argument(
        "--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="skip larger images (bombs) (default: %(default)s)"
    )
    parser.add_argument(
        "--min-side",
        type=int,
        default=DEFAULT_MIN_SIDE,
        help="skip images whose shorter side is under this (default: %(default)s)",
    )
    parser.add_argument(
        "--jpeg-quality", type=int, default=90, help="quality of re-encoded images (default: %(default)s)"
    )
    parser.add_argument(
        "--shard-samples",
        type=int,
        default=DEFAULT_SHARD_SAMPLES,
        help="samples per shard at most (default: %(default)s)",
    )
    parser.add_argument(
        "--min-shards",
        type=int,
        default=DEFAULT_MIN_SHARDS,
        help="write smaller shards when a split would fill fewer than this many; epoch-mode training needs "
        "ranks x workers shards (default: %(default)s)",
    )
    parser.add_argument(
        "--shard-bytes", type=int, default=500_000_000, help="close a shard past this size (default: %(default)s)"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="image processes")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the global shuffle before sharding (default: %(default)s)"
    )
    parser.add_argument("--max-bad-fraction", type=float, help="fail when more images than this are skipped")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.source in ("coco", "flickr30k", "vqa") and not args.root:
        parser.error(f"--source {args.source} needs --root")
    if args.source == "hf" and not args.hf_dataset:
        parser.error("--source hf needs --hf-dataset")
    if min(args.max_size, args.shard_samples, args.shard_bytes, args.max_pixels, args.min_shards) < 1:
        parser.error("--max-size, --max-pixels, --shard-samples, --min-shards and --shard-bytes must be positive")
    if not 0 < args.holdout_fraction < 0.5:
        parser.error("--holdout-fraction must be between 0 and 0.5 (val and test each take that much)")
    args.name = args.name or args.source
    args.out = args.out or f"data/shards/{args.name}"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        splits = [s.strip() for s in args.splits.split(",") if s.strip()]
        sources = {split: read_source(args, split) for split in splits}  # every split checked before any is written
        for split, source in sources.items():
            manifest, skipped = shard_split(args, split, source)
            rule = manifest["options"]["split_rule"]
            cut = f" (cut by image-id hash: {split} = {rule[split]})" if rule else ""
            print(
                f"{split}: {manifest['num_samples']} samples in {manifest['num_shards']} shards "
                f"({manifest['bytes'] / 1e6:.1f} MB) -> {Path(args.out) / split}{cut}; skipped: {skipped}"
            )
            if manifest["num_shards"] < args.min_shards:
                print(
                    f"warning: {split} has {manifest['num_shards']} shards, fewer than --min-shards "
                    f"{args.min_shards}: epoch-mode training on it can use at most {manifest['num_shards']} "
                    f"ranks x workers (or use mode: resampled)",
                    file=sys.stderr,
                )
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
