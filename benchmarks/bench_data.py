"""Loader throughput: our shard loader vs. an ALBEF/LAVIS-style PIL folder dataset, in the same run.

Two image sets: the default synthetic one (96x96 originals, stored as they are) and a COCO-sized one
(480x480 originals, stored by make_shards at shorter side 256, decoded with JPEG draft), because the
shard format wins mostly by storing and decoding fewer pixels and by sequential reads.

Both do decode + random resized crop + normalize + tokenize + MLM-mask + collate to the same batch
contract with the same number of DataLoader workers; the baseline reads one JPEG file per sample from
the COCO-layout folder with PIL (Image.open(path).convert("RGB"), crop then resize, per-image float
tensor and normalization), as ALBEF/LAVIS datasets do.

Two more rows: our loader with libjpeg-turbo switched off (PIL's draft decode: what jpeg.py adds), and
OpenCLIP's webdataset training pipeline. OpenCLIP's own `get_wds_dataset` cannot run here: importing
`open_clip_train.data` imports `torchvision.datasets` at module level, and the preprocess it is given comes
from `open_clip.image_transform`, built from torchvision transforms; torchvision does not import beside
this torch. `openclip_wds_equivalent` is therefore that function's pipeline rebuilt stage by stage from
webdataset's own stages (see openclip_wds_loader), with torchvision's RandomResizedCrop/ToTensor/Normalize
done by the same PIL and tensor operations. It tokenizes (our fast tokenizer, per sample, as OpenCLIP calls
its tokenizer) but does not MLM-mask or build our batch dict: it does less work than ours.
Every row crops with scale 0.5-1.0 (OpenCLIP's default is 0.9-1.0) to the same output size, with the same
DataLoader workers. Prints one JSON object.

    python -m benchmarks.bench_data --shards data/shards/synthetic/train --coco-root data/synthetic_coco
"""

import argparse
import contextlib
import json
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from data_pipeline import jpeg, load_tokenizer, make_train_loader
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


class OpenClipTrainTransform:
    """open_clip.image_transform(is_train=True) without torchvision: RandomResizedCrop (bicubic; on a PIL image
    torchvision crops, then resizes with PIL), then ToTensor (float / 255) and Normalize (a new tensor)."""

    def __init__(self, size: int, scale: tuple[float, float]):
        self.size, self.scale = size, scale
        self.mean, self.std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        box = random_crop_box(*image.size, random, self.scale)
        image = image.crop(box).resize((self.size, self.size), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.array(image, np.uint8, copy=True)).permute(2, 0, 1).contiguous()
        return (pixels.float().div(255) - self.mean) / self.std


def openclip_wds_loader(shard_dir: str, tokenizer, batch_size: int, workers: int, image_size: int, max_len: int,
                        batches: int):  # fmt: skip
    """open_clip_train.data.get_wds_dataset(is_train=True), not resampled, from webdataset's stages: shard
    list, seeded shard shuffle (2000/500), split by node and worker, tar to samples (errors skipped),
    sample shuffle (5000/1000), keep samples with caption and image, decode "pilrgb", rename, preprocess
    image and tokenize text per sample, tuples, batches, with_epoch; then WebLoader(batch_size=None)."""
    import webdataset as wds

    from data_pipeline.shards import resolve_shards

    def tokenize(text: str) -> torch.Tensor:
        return tokenizer(text, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")[
            "input_ids"][0]  # fmt: skip

    def has_caption_and_image(sample: dict) -> bool:
        return "txt" in sample and any(ext in sample for ext in ("png", "jpg", "jpeg", "webp"))

    shards = [shard.path for shard in resolve_shards(shard_dir).shards]
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(shards),
        wds.detshuffle(bufsize=2000, initial=500, seed=0),
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.shuffle(5000, 1000),
        wds.select(has_caption_and_image),
        wds.decode("pilrgb", handler=wds.warn_and_continue),
        wds.rename(image="jpg;png;jpeg;webp", text="txt"),
        wds.map_dict(image=OpenClipTrainTransform(image_size, (0.5, 1.0)), text=tokenize),
        wds.to_tuple("image", "text"),
        wds.batched(batch_size, partial=False),
    ).with_epoch(batches + 1)
    return wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=workers,
                         persistent_workers=workers > 0)  # fmt: skip


@contextlib.contextmanager
def pil_jpeg_decoding():
    """Our loader with libjpeg-turbo off (workers fork inside, so they inherit the switch)."""
    saved, jpeg.simplejpeg = jpeg.simplejpeg, None
    try:
        yield
    finally:
        jpeg.simplejpeg = saved


def throughput(batches, max_batches: int) -> float:
    """Samples/s after the first batch (worker start-up and shuffle-buffer filling excluded for all)."""
    iterator = iter(batches)
    first = next(iterator)
    start, samples, count = time.perf_counter(), 0, 1
    for batch in iterator:
        samples += _pixels(batch).shape[0]
        count += 1
        if count >= max_batches:
            break
    elapsed = time.perf_counter() - start
    assert _pixels(first).dtype == torch.float32
    del iterator  # shuts the workers down before the other loader is timed
    return samples / elapsed


def _pixels(batch) -> torch.Tensor:
    return batch["pixel_values"] if isinstance(batch, dict) else batch[0]  # OpenCLIP's batches are tuples


LOADERS = ("baseline_pil_folder", "openclip_wds_equivalent", "shards_pil_decode", "shards")


def compare(shards: str, coco_root: str, tokenizer, args) -> dict:
    """The loaders take turns `repeats` times (the order rotates), because a shared machine slows whichever
    runs at that moment; the median and every run are reported, so the noise shows, and each ratio is taken
    between runs of the same round."""
    runs: dict[str, list[float]] = {name: [] for name in LOADERS}
    for repeat in range(args.repeats):
        for name in LOADERS[repeat % len(LOADERS) :] + LOADERS[: repeat % len(LOADERS)]:
            if name.startswith("shards"):
                loader = make_train_loader(
                    shards, tokenizer, batch_size=args.batch_size, rank=0, world_size=1, num_workers=args.workers,
                    seed=repeat, image_size=args.image_size, max_len=args.max_len,
                )  # fmt: skip
            elif name == "openclip_wds_equivalent":
                loader = openclip_wds_loader(
                    shards, tokenizer, args.batch_size, args.workers, args.image_size, args.max_len, args.batches
                )
            else:
                loader = baseline_loader(
                    coco_root, tokenizer, args.batch_size, args.workers, args.image_size, args.max_len
                )
            with pil_jpeg_decoding() if name == "shards_pil_decode" else contextlib.nullcontext():
                runs[name].append(throughput(loader, args.batches))
    results = {name: _spread(values) for name, values in runs.items()}
    results["per_worker_samples_per_s"] = {
        name: round(results[name]["median"] / max(1, args.workers), 1) for name in LOADERS
    }
    for label, other in [("speedup", "baseline_pil_folder"), ("vs_openclip", "openclip_wds_equivalent"),
                         ("turbo_gain", "shards_pil_decode")]:  # fmt: skip
        results[label] = _spread([ours / base for ours, base in zip(runs["shards"], runs[other])], digits=2)
    return results


def decode_cpu_cost(shard_dir: str, repeats: int, count: int = 300) -> dict:
    """CPU microseconds of train_image (decode, crop, resize) per image with libjpeg-turbo and with PIL, in this
    process alternately: process time does not count the other programs sharing the machine."""
    from data_pipeline.samples import parse_sample, read_samples
    from data_pipeline.shards import resolve_shards
    from data_pipeline.transforms import train_image

    paths = [shard.path for shard in resolve_shards(shard_dir).shards]
    images = [parse_sample(raw, Counter()).image for raw, _ in zip(read_samples(paths, Counter()), range(count))]
    runs: dict[str, list[float]] = {"pil": [], "turbo": []}
    for repeat in range(max(2, repeats)):
        for name in ("pil", "turbo")[:: 1 if repeat % 2 == 0 else -1]:
            with pil_jpeg_decoding() if name == "pil" else contextlib.nullcontext():
                start = time.process_time()
                for index, data in enumerate(images):
                    train_image(data, random.Random(index), size=64, scale=(0.5, 1.0))
                runs[name].append((time.process_time() - start) / len(images) * 1e6)
    result = {f"{name}_us": _spread(values, digits=0) for name, values in runs.items()}
    result["turbo_gain"] = round(statistics.median(runs["pil"]) / statistics.median(runs["turbo"]), 2)
    return result


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
    parser.add_argument("--repeats", type=int, default=4, help="rounds in which every loader runs once")
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
    report["synthetic_96px"]["train_image_cpu"] = decode_cpu_cost(args.shards, args.repeats)
    if args.large_images:
        shards, root = large_image_set(Path(args.large_dir), args.large_images)
        report["coco_sized_480px"] = compare(shards, root, tokenizer, args)
        report["coco_sized_480px"]["train_image_cpu"] = decode_cpu_cost(shards, args.repeats)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
