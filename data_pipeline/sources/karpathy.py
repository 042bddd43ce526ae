"""Karpathy split files (dataset_coco.json, dataset_flickr30k.json) used by ALBEF/BLIP for train/val/test."""

import json
from pathlib import Path

from data_pipeline.errors import DataError
from data_pipeline.sources import SourceSplit, collect

# ALBEF/BLIP train on "restval" too: the 113k-image COCO train split.
SPLIT_MEMBERS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


def read_karpathy(split_file: str | Path, image_root: str | Path, split: str) -> SourceSplit:
    """Images of `split` from a Karpathy JSON; each image at image_root/[filepath/]filename."""
    if split not in SPLIT_MEMBERS:
        raise DataError(f"Karpathy splits are {tuple(SPLIT_MEMBERS)}, not {split!r}; fix --splits")
    split_file = Path(split_file)
    if not split_file.is_file():
        raise DataError(f"Karpathy split file {split_file} not found; fix --karpathy-json")
    try:
        images = json.loads(split_file.read_text(encoding="utf-8", errors="surrogateescape"))["images"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise DataError(f"{split_file} is not a Karpathy split file (no 'images' list); fix --karpathy-json") from exc
    image_root = Path(image_root)
    return collect(
        (
            image.get("cocoid", image.get("imgid")),
            str(image_root / image.get("filepath", "") / image["filename"]),
            [sentence.get("raw", "") for sentence in image.get("sentences", [])],
        )
        for image in images
        if image.get("split") in SPLIT_MEMBERS[split]
    )
