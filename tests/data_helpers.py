"""Builders for tiny on-disk dataset layouts used by the data tests."""

import io
import json
import tarfile
from pathlib import Path

from PIL import Image


def image_bytes(width: int = 40, height: int = 30, color=(200, 30, 30), fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format=fmt)
    return buffer.getvalue()


def write_coco(root: Path, split: str, images: list[dict], captions: list[tuple[int, str]]) -> None:
    """images: {"id", "file_name", "data" (bytes or None: file left missing)}; captions: (image_id, text)."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / f"{split}2017").mkdir(exist_ok=True)
    for image in images:
        if image.get("data") is not None:
            (root / f"{split}2017" / image["file_name"]).write_bytes(image["data"])
    document = {
        "images": [{"id": i["id"], "file_name": i["file_name"]} for i in images],
        "annotations": [{"id": n, "image_id": i, "caption": c} for n, (i, c) in enumerate(captions)],
    }
    (root / "annotations" / f"captions_{split}2017.json").write_text(json.dumps(document))


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
