"""Hugging Face `datasets`: a hub name or a local path (save_to_disk output), with configurable columns.

Split names follow the dataset: `val` finds `validation` (and the other way round). A saved single Dataset
has no splits, so its rows are split by image-id hash (sources.hash_split_rule).
"""

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

# names one split goes by in different datasets; the first one the dataset has is used
SPLIT_ALIASES = {
    "val": ("val", "validation", "valid", "dev"),
    "validation": ("validation", "val", "valid", "dev"),
    "test": ("test", "testing"),
}


def read_hf(
    name_or_path: str,
    split: str,
    *,
    image_column: str = "image",
    caption_column: str = "caption",
    id_column: str | None = None,
    holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION,
) -> SourceSplit:
    """One record per row; a caption cell may hold one string or a list; ids default to the row index."""
    import datasets

    dataset, has_splits = _load(name_or_path, split)
    for column in (image_column, caption_column, id_column):
        if column is not None and column not in dataset.column_names:
            raise DataError(f"column {column!r} not in {name_or_path} ({dataset.column_names}); fix the column option")
    if isinstance(dataset.features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))  # keep original bytes

    def rows():
        for index, row in enumerate(dataset):
            captions = row[caption_column]
            captions = captions if isinstance(captions, list) else [captions]
            image_id = row[id_column] if id_column else index
            if has_splits or in_hash_split(image_id, split, holdout_fraction):
                yield image_id, _image_of(row[image_column]), captions

    source = collect(rows())
    source.split_rule = None if has_splits else hash_split_rule(holdout_fraction)
    return source


def dataset_split(split: str, available: list[str], name_or_path: str) -> str:
    """The dataset's own name for `split` (`val` -> `validation` ...); DataError when it has none."""
    for candidate in SPLIT_ALIASES.get(split, (split,)):
        if candidate in available:
            return candidate
    raise DataError(f"{name_or_path} has splits {available}, not {split!r}; fix --splits")


def _load(name_or_path: str, split: str):
    """(the split's Dataset, whether the dataset has splits at all)."""
    import datasets

    if Path(name_or_path).is_dir():
        loaded = datasets.load_from_disk(name_or_path)
        if isinstance(loaded, datasets.DatasetDict):
            return loaded[dataset_split(split, list(loaded), name_or_path)], True
        check_hash_split(split, f"{name_or_path} (one saved Dataset)")
        return loaded, False
    try:
        available = datasets.get_dataset_split_names(name_or_path)
    except Exception as exc:
        raise DataError(f"cannot load dataset {name_or_path!r} ({exc}); check the name or path") from exc
    try:
        return datasets.load_dataset(name_or_path, split=dataset_split(split, available, name_or_path)), True
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot load dataset {name_or_path!r} ({exc}); check the name or path") from exc


def _image_of(cell) -> str | bytes:
    """datasets.Image(decode=False) cells are {"bytes", "path"}; plain columns hold bytes or a path."""
    if isinstance(cell, dict):
        return cell.get("bytes") or cell.get("path") or b""
    return cell if cell is not None else b""
