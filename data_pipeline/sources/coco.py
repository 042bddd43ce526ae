"""COCO captions in the official layout: annotations/captions_{split}2017.json + {split}2017/ images."""

import json
from collections import defaultdict
from pathlib import Path

from data_pipeline.errors import DataError
from data_pipeline.sources import SourceSplit, collect

SPLITS = ("train", "val")


def read_coco(root: str | Path, split: str) -> SourceSplit:
    """All images of `split` listed in the captions file, each with all of its captions."""
    if split not in SPLITS:
        raise DataError(f"COCO official layout has splits {SPLITS}, not {split!r}; use --splits train,val")
    root = Path(root)
    annotation_file = root / "annotations" / f"captions_{split}2017.json"
    if not annotation_file.is_file():
        raise DataError(f"{annotation_file} not found; point --root at a COCO directory with annotations/")
    try:
        data = json.loads(annotation_file.read_text(encoding="utf-8", errors="surrogateescape"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{annotation_file} is not valid JSON ({exc}); re-download it") from exc
    captions = defaultdict(list)
    for annotation in data.get("annotations", []):
        captions[annotation["image_id"]].append(annotation.get("caption", ""))
    image_dir = root / f"{split}2017"
    return collect(
        (image["id"], str(image_dir / image["file_name"]), captions.get(image["id"], []))
        for image in data.get("images", [])
    )
