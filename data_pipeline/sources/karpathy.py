"""Karpathy split files (dataset_coco.json, dataset_flickr30k.json) used by ALBEF/BLIP for train/val/test.

dataset_coco.json names the 2014 files (`train2014/COCO_train2014_000000000009.jpg`). COCO-2017 holds the
same images renamed by id and re-split (`{train,val}2017/000000000009.jpg`), so an image missing from the
2014 path is looked up by its cocoid in both 2017 folders.
"""

import json
import os
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
    files_2017 = {folder: _file_names(image_root / folder) for folder in COCO_2017_FOLDERS}
    return collect(
        (
            image.get("cocoid", image.get("imgid")),
            _image_path(image, image_root, files_2017),
            [sentence.get("raw", "") for sentence in image.get("sentences", [])],
        )
        for image in images
        if image.get("split") in SPLIT_MEMBERS[split]
    )


COCO_2017_FOLDERS = ("train2017", "val2017")


def _file_names(folder: Path) -> set[str]:
    return set(os.listdir(folder)) if folder.is_dir() else set()


def _image_path(image: dict, image_root: Path, files_2017: dict[str, set[str]]) -> str:
    """The file as the split file names it, else its COCO-2017 name; the former when neither exists."""
    named = image_root / image.get("filepath", "") / image["filename"]
    if "cocoid" in image and not named.is_file():
        renamed = f"{int(image['cocoid']):012d}.jpg"
        for folder, names in files_2017.items():
            if renamed in names:
                return str(image_root / folder / renamed)
    return str(named)
