"""Flickr30k: flickr30k-images/ with the Karpathy split file, or with the plain caption file.

The plain caption files carry no split, so all of their images form one split (named by --splits).
Lines are read as bytes so one non-UTF-8 caption is counted and skipped instead of failing the file.
"""

from collections import defaultdict
from pathlib import Path

from data_pipeline.errors import DataError
from data_pipeline.sources import SourceSplit, collect
from data_pipeline.sources.karpathy import read_karpathy

CAPTION_FILES = ("results_20130124.token", "results.csv")


def read_flickr30k(root: str | Path, split: str, karpathy_json: str | Path | None = None) -> SourceSplit:
    root = Path(root)
    image_dir = root / "flickr30k-images"
    if karpathy_json is not None:
        return read_karpathy(karpathy_json, image_dir, split)
    for name in CAPTION_FILES:
        if (root / name).is_file():
            captions = _read_caption_file(root / name)
            break
    else:
        raise DataError(f"no {' or '.join(CAPTION_FILES)} in {root}; pass --karpathy-json or fix --root")
    return collect((Path(file_name).stem, str(image_dir / file_name), lines) for file_name, lines in captions.items())


def _read_caption_file(path: Path) -> dict[str, list[bytes]]:
    """`name.jpg#n<TAB>caption` (.token) or `name.jpg| n| caption` (.csv, with a header line)."""
    captions: dict[str, list[bytes]] = defaultdict(list)
    lines = path.read_bytes().splitlines()
    if path.suffix == ".csv":
        for line in lines[1:]:
            parts = line.split(b"|", 2)
            if len(parts) == 3:
                captions[parts[0].strip().decode("utf-8", "replace")].append(parts[2].strip())
    else:
        for line in lines:
            name, _, caption = line.partition(b"\t")
            if name:
                captions[name.split(b"#")[0].strip().decode("utf-8", "replace")].append(caption.strip())
    return captions
