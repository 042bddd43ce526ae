"""Hugging Face `datasets`: a hub name or a local path (save_to_disk output), with configurable columns."""

from pathlib import Path

from data_pipeline.errors import DataError
from data_pipeline.sources import SourceSplit, collect


def read_hf(
    name_or_path: str,
    split: str,
    *,
    image_column: str = "image",
    caption_column: str = "caption",
    id_column: str | None = None,
) -> SourceSplit:
    """One record per row; a caption cell may hold one string or a list; ids default to the row index."""
    import datasets

    dataset = _load(name_or_path, split)
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
            yield image_id, _image_of(row[image_column]), captions

    return collect(rows())


def _load(name_or_path: str, split: str):
    import datasets

    if Path(name_or_path).is_dir():
        loaded = datasets.load_from_disk(name_or_path)
    else:
        try:
            return datasets.load_dataset(name_or_path, split=split)
        except Exception as exc:
            raise DataError(f"cannot load dataset {name_or_path!r} ({exc}); check the name or path") from exc
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{name_or_path} has splits {list(loaded)}, not {split!r}; fix --splits")
        return loaded[split]
    return loaded


def _image_of(cell) -> str | bytes:
    """datasets.Image(decode=False) cells are {"bytes", "path"}; plain columns hold bytes or a path."""
    if isinstance(cell, dict):
        return cell.get("bytes") or cell.get("path") or b""
    return cell if cell is not None else b""
