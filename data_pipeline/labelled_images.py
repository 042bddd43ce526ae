"""Labelled image sets for classification: an ImageFolder directory or a Hugging Face `datasets` set.

ImageFolder: one sub-folder per class, the folder name is the class, classes in sorted order (as
torchvision's ImageFolder). `datasets`: a hub name or a save_to_disk folder with an image column and a
ClassLabel column whose names are the classes. Either way images stay encoded bytes until a batch needs
them; images that cannot be decoded are skipped and counted.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data_pipeline.errors import DataError
from data_pipeline.images import DEFAULT_MAX_PIXELS, ImageRejected, load_rgb, open_checked
from data_pipeline.sources.hf import dataset_split

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


@dataclass
class LabelledImages:
    classes: list[str]
    images: list[bytes]
    labels: torch.Tensor  # [N] class index of each image
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)


def read_labelled_images(spec: str, *, split: str = "test", image_column: str = "image",
                         label_column: str = "label", max_pixels: int = DEFAULT_MAX_PIXELS) -> LabelledImages:
    """A save_to_disk folder or a hub name goes to `datasets`; any other folder is an ImageFolder."""
    path = Path(spec)
    saved = (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
    if path.is_dir() and not saved:
        return read_image_folder(path, max_pixels=max_pixels)
    return read_hf_classification(spec, split=split, image_column=image_column, label_column=label_column,
                                  max_pixels=max_pixels)


def read_image_folder(root: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> LabelledImages:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{root} has no class sub-folders; put each class's images in <root>/<class name>/")
    rows = []
    for label, name in enumerate(classes):
        files = sorted(f for f in (root / name).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"class folder {root / name} holds no image ({', '.join(IMAGE_SUFFIXES)}); add images "
                            "or remove the folder")
        rows += [(f.read_bytes(), label) for f in files]
    return _checked(classes, rows, max_pixels)


def read_hf_classification(name_or_path: str, *, split: str = "test", image_column: str = "image",
                           label_column: str = "label", max_pixels: int = DEFAULT_MAX_PIXELS) -> LabelledImages:
    import datasets

    dataset = _load_split(name_or_path, split)
    columns = dataset.column_names
    if label_column not in columns or not isinstance(dataset.features[label_column], datasets.ClassLabel):
        labels = [c for c in columns if isinstance(dataset.features[c], datasets.ClassLabel)]
        raise DataError(f"{name_or_path} has no ClassLabel column {label_column!r} (columns: {columns}); pass "
                        f"--label-column {labels[0] if labels else '<a ClassLabel column>'}")
    if image_column not in columns:
        raise DataError(f"{name_or_path} has no image column {image_column!r} (columns: {columns}); pass "
                        "--image-column")
    if isinstance(dataset.features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))  # keep the original bytes
    rows = []
    for row in dataset.select_columns([image_column, label_column]):
        cell = row[image_column]  # Image(decode=False): {"bytes", "path"}; a plain column: bytes or a path
        cell = (cell.get("bytes") or cell.get("path") or b"") if isinstance(cell, dict) else cell
        rows.append((Path(cell).read_bytes() if isinstance(cell, str) else cell, row[label_column]))
    return _checked(list(dataset.features[label_column].names), rows, max_pixels)


def _load_split(name_or_path: str, split: str):
    """A saved single Dataset is used whole (a classification set is one split); else the split by its name."""
    import datasets

    try:
        if Path(name_or_path).is_dir():
            loaded = datasets.load_from_disk(name_or_path)
            if not isinstance(loaded, datasets.DatasetDict):
                return loaded
            return loaded[dataset_split(split, list(loaded), name_or_path)]
        available = datasets.get_dataset_split_names(name_or_path)
        return datasets.load_dataset(name_or_path, split=dataset_split(split, available, name_or_path))
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot load dataset {name_or_path!r} ({exc}); check the name or path") from exc


def _checked(classes: list[str], rows: list[tuple[bytes, int]], max_pixels: int) -> LabelledImages:
    skipped: Counter = Counter()
    kept = []
    for image, label in rows:
        try:  # decoded once up front, so a bad image is dropped here and not in the middle of an evaluation
            load_rgb(open_checked(image, max_pixels))
            kept.append((image, label))
        except ImageRejected as rejected:
            skipped[rejected.reason] += 1
    if not kept:
        raise DataError(f"no readable image among {len(rows)} (skipped: {dict(skipped)}); check the image files")
    images, labels = zip(*kept)
    return LabelledImages(classes, list(images), torch.tensor(labels, dtype=torch.long), dict(skipped))


def few_shot_rows(labels: torch.Tensor, classes: list[str], shots: int, seed: int) -> list[int]:
    """`shots` rows per class of `labels` drawn without replacement by `seed` (the same draw for a seed,
    whatever else ran)."""
    rng = random.Random(seed)
    rows = []
    for label, name in enumerate(classes):
        members = (labels == label).nonzero().flatten().tolist()
        if len(members) < shots:
            raise DataError(f"class {name!r} has {len(members)} training images, fewer than the {shots} shots asked "
                            f"for; add images or lower --shots to at most {len(members)}")
        rows += rng.sample(members, shots)
    return rows
