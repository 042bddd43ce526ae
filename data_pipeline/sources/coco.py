"""COCO captions in the official layout: annotations/captions_{split}2017.json + {split}2017/ images.

The 2014 release (annotations/captions_{split}2014.json + {split}2014/COCO_{split}2014_*.jpg) is read
the same way when the 2017 annotation file is absent.
"""

import json
from collections import defaultdict
from pathlib import Path

from data_pipeline.errors import DataError
from data_pipeline.sources import SourceSplit, collect

SPLITS = ("train", "val")
YEARS = ("2017", "2014")


def read_coco(root: str | Path, split: str) -> SourceSplit:
    """All images of `split` listed in the captions file, each with all of its captions.

    Captions whose image_id is not in images[] are counted as `caption_without_image`.
    """
    if split not in SPLITS:
        raise DataError(f"COCO official layout has splits {SPLITS}, not {split!r}; use --splits train,val")
    root = Path(root)
    year = next((y for y in YEARS if (root / "annotations" / f"captions_{split}{y}.json").is_file()), YEARS[0])
    annotation_file = root / "annotations" / f"captions_{split}{year}.json"
    if not annotation_file.is_file():
        raise DataError(f"{annotation_file} not found; point --root at a COCO directory with annotations/")
    try:
        data = json.loads(annotation_file.read_text(encoding="utf-8", errors="surrogateescape"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{annotation_file} is not valid JSON ({exc}); re-download it") from exc
    captions = defaultdict(list)
    for annotation in data.get("annotations", []):
        captions[annotation["image_id"]].append(annotation.get("caption", ""))
    image_dir = root / f"{split}{year}"
    images = data.get("images", [])
    source = collect((i["id"], str(image_dir / i["file_name"]), captions.get(i["id"], [])) for i in images)
    listed = {image["id"] for image in images}
    orphans = sum(len(texts) for image_id, texts in captions.items() if image_id not in listed)
    if orphans:
        source.skipped["caption_without_image"] = orphans
    return source
