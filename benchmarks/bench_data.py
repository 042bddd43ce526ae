"""Loader throughput: our shard loader vs. an ALBEF/LAVIS-style PIL folder dataset, in the same run.

Two image sets: the default synthetic one (96x96 originals, stored as they are) and a COCO-sized one
(480x480 originals, stored by make_shards at shorter side 256, decoded with JPEG draft), because the
shard format wins mostly by storing and decoding fewer pixels and by sequential reads.

Both do decode + random resized crop + normalize + tokenize + MLM-mask + collate to the same batch
contract with the same number of DataLoader workers; the baseline reads one JPEG file per sample from
the COCO-layout folder with PIL (Image.open(path).convert("RGB"), crop then resize, per-image float
tensor and normalization), as ALBEF/LAVIS datasets do. Prints one JSON object.

    python -m benchmarks.bench_data --shards data/shards/synthetic/train --coco-root data/synthetic_coco
"""

import argparse
import contextlib
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from data_pipeline import load_tokenizer, make_train_loader
from data_pipeline.collate import collate_train
from data_pipeline.sources.coco import read_coco
from data_pipeline.text import clean_caption
from data_pipeline.transforms import MEAN, STD, random_crop_box


class FolderDataset(Dataset):
    """The baseline: one image file per sample, opened and transformed per image."""

    def __init__(self, root: str, image_size: int):
        self.records = read_coco(root, "train").records
        self.image_size = image_size
        self.mean = torch.tensor(MEAN).view(3, 1, 1)
        self.std = torch.tensor(STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        record = self.records[index]
        rng = random.Random(index)
        image = Image.open(record.image).convert("RGB")
        image = image.crop(random_crop_box(*image.size, rng, (0.5, 1.0)))
        image = image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        pixels = pixels.view(self.image_size, self.image_size, 3).permute(2, 0, 1).float() / 255
        return (pixels - self.mean) / self.std, clean_caption(rng.choice(record.captions)), record.image_id


def baseline_loader(root: str, tokenizer, batch_size: int, workers: int, image_size: int, max_len: int):
    def collate(samples):
        pixels, captions, ids = zip(*samples)
        batch = collate_train(
            [torch.zeros(3, 1, 1, dtype=torch.uint8)] * len(pixels),  # replaced below: already normalized
            list(captions),
            list(ids),
            [int(i) for i in ids],
            tokenizer=tokenizer,
            max_len=max_len,
            mlm_probability=0.15,
            generator=torch.Generator().manual_seed(len(samples)),
        )
        batch["pixel_values"] = torch.stack(pixels)
        return batch

    dataset = FolderDataset(root, image_size)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=workers, collate_fn=collate, drop_last=True
    )


def throughput(batches, max_batches: int) -> float:
    """Samples/s after the first batch (worker start-up and shuffle-buffer filling excluded for both)."""
    iterator = iter(batches)
    first = next(iterator)
    start, samples, count = time.perf_counter(), 0, 1
    for batch in iterator:
        samples += batch["pixel_values"].shape[0]
        count += 1
        if count >= max_batches:
            break
    elapsed = time.perf_counter() - start
    assert first["pixel_values"].dtype == torch.float32
    del iterator  # shuts the workers down before the other loader is timed
    return samples / elapsed


def compare(shards: str, coco_root: str, tokenizer, args) -> dict:
    """The two loaders alternate `repeats` times (who goes first alternates too), because a shared machine
    slows whichever runs at that moment; the median and every run are reported, so the noise shows."""
    runs: dict[str, list[float]] = {"baseline_pil_folder": [], "shards": []}
    for repeat in range(args.repeats):
        order = ["baseline_pil_folder", "shards"][:: 1 if repeat % 2 == 0 else -1]
        for name in order:
            if name == "shards":
                loader = make_train_loader(
                    shards, tokenizer, batch_size=args.batch_size, rank=0, world_size=1, num_workers=args.workers,
                    seed=repeat, image_size=args.image_size, max_len=args.max_len,
                )  # fmt: skip
            else:
                loader = baseline_loader(
                    coco_root, tokenizer, args.batch_size, args.workers, args.image_size, args.max_len
                )
            runs[name].append(throughput(loader, args.batches))
    speedups = [ours / base for ours, base in zip(runs["shards"], runs["baseline_pil_folder"])]
    results = {name: _spread(values) for name, values in runs.items()}
    results["shards_per_worker_samples_per_s"] = round(results["shards"]["median"] / max(1, args.workers), 1)
    results["speedup"] = _spread(speedups, digits=2)
    return results


def _spread(values: list[float], digits: int = 1) -> dict:
    return {"median": round(statistics.median(values), digits), "runs": [round(v, digits) for v in values]}


def large_image_set(directory: Path, count: int) -> tuple[str, str]:
    """COCO-sized (480x480) synthetic originals and their shards (shorter side 256), built once."""
    from data_pipeline.make_shards import main as make_shards
    from data_pipeline.synthetic import generate

    root, shards = directory / "coco_layout", directory / "shards"
    if not (root / "annotations/captions_val2017.json").is_file():
        generate(root, train=count, val=0, size=480, workers=2)
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON report
        make_shards(["--root", str(root), "--out", str(shards), "--splits", "train", "--name", "large", "--quiet"])
    return str(shards / "train"), str(root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default="data/shards/synthetic/train")
    parser.add_argument("--coco-root", default="data/synthetic_coco")
    parser.add_argument("--tokenizer", default="data/tokenizer")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers for both loaders")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=32)
    parser.add_argument("--batches", type=int, default=60, help="batches timed per loader and run")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each loader")
    parser.add_argument("--large-images", type=int, default=2000, help="also compare on this many 480px images")
    parser.add_argument("--large-dir", default="data/bench_large", help="where the 480px set is built (once)")
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.tokenizer)
    report = {
        "workers": args.workers,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "repeats": args.repeats,
        "synthetic_96px": compare(args.shards, args.coco_root, tokenizer, args),
    }
    if args.large_images:
        shards, root = large_image_set(Path(args.large_dir), args.large_images)
        report["coco_sized_480px"] = compare(shards, root, tokenizer, args)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
