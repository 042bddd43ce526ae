"""Flickr30k: the images with the Karpathy split file, or with the plain caption file.

The official download unpacks to flickr30k-images/ next to results_20130124.token; Kaggle's to
flickr30k_images/ holding results.csv and the images' flickr30k_images/ folder.

The Karpathy file carries the split of every image. The plain caption files carry none, so their images
are split by image-id hash (sources.hash_split_rule): train, val and test never share an image.
Lines are read as bytes so one non-UTF-8 caption is counted and skipped instead of failing the file.
"""

import re
from collections import Counter, defaultdict
from pathlib import Path

from data_pipeline.errors import DataError
from data_pipeline.sources import (
    DEFAULT_HOLDOUT_FRACTION,
    SourceSplit,
    check_hash_split,
    collect,
    hash_split_rule,
    in_hash_split,
)
from data_pipeline.sources.karpathy import read_karpathy

CAPTION_FILES = ("results_20130124.token", "results.csv")
IMAGE_FOLDERS = ("flickr30k-images", "flickr30k_images")  # official, Kaggle
# the Kaggle results.csv has a line whose second separator is a space: `2199200615.jpg| 4 A dog ...`
_NUMBER_THEN_CAPTION = re.compile(rb"\s*\d+\s+(.*)", re.DOTALL)


def read_flickr30k(
    root: str | Path,
    split: str,
    karpathy_json: str | Path | None = None,
    *,
    holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION,
) -> SourceSplit:
    root = Path(root)
    image_dir = next((root / name for name in IMAGE_FOLDERS if (root / name).is_dir()), root / IMAGE_FOLDERS[0])
    if karpathy_json is not None:
        return read_karpathy(karpathy_json, image_dir, split)
    check_hash_split(split, "the plain Flickr30k caption file")
    for name in CAPTION_FILES:
        if (root / name).is_file():
            captions, unparseable = _read_caption_file(root / name)
            break
    else:
        raise DataError(f"no {' or '.join(CAPTION_FILES)} in {root}; pass --karpathy-json or fix --root")
    source = collect(
        (Path(file_name).stem, str(image_dir / file_name), lines)
        for file_name, lines in captions.items()
        if in_hash_split(Path(file_name).stem, split, holdout_fraction)
    )
    # a line that names no image is counted in the train split's manifest, so the splits' counts add up
    unparsed = sum(
        n
        for file_name, n in unparseable.items()
        if (in_hash_split(Path(file_name).stem, split, holdout_fraction) if file_name else split == "train")
    )
    if unparsed:
        source.skipped["unparseable_line"] = unparsed
    source.split_rule = hash_split_rule(holdout_fraction)
    return source


def _read_caption_file(path: Path) -> tuple[dict[str, list[bytes]], Counter]:
    """`name.jpg#n<TAB>caption` (.token) or `name.jpg| n| caption` (.csv, with a header line).

    Returns the captions per file name and the count of lines that hold no caption, per file name ("" when
    the line names none).
    """
    captions: dict[str, list[bytes]] = defaultdict(list)
    unparseable: Counter = Counter()
    lines = path.read_bytes().splitlines()
    if path.suffix == ".csv":
        for line in lines[1:]:
            name, separator, rest = line.partition(b"|")
            name = name.strip().decode("utf-8", "replace")
            number, second, caption = rest.partition(b"|")
            if not second:
                match = _NUMBER_THEN_CAPTION.fullmatch(rest)
                caption = match.group(1) if match else None
            if not line.strip():
                continue
            if not separator or caption is None:
                unparseable[name if separator else ""] += 1
                continue
            captions[name].append(caption.strip())
    else:
        for line in lines:
            if not line.strip():
                continue
            name, separator, caption = line.partition(b"\t")
            name = name.split(b"#")[0].strip().decode("utf-8", "replace")
            if not separator:
                unparseable[""] += 1
                continue
            captions[name].append(caption.strip())
    return captions, unparseable
