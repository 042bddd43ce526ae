"""Builders for tiny on-disk dataset layouts used by the data tests."""

import io
import json
import pickle
import shutil
import struct
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

import webdataset as wds
from PIL import Image

from data_pipeline.manifest import MANIFEST, file_sha256, write_json_atomic

# OpenAI CLIP's preprocessing statistics (ALBEF and BLIP use them), written out here rather than imported from the
# code under test: a test that read them from data_pipeline.transforms would accept any constants
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def image_bytes(
    width: int = 80, height: int = 64, color: tuple[int, int, int] = (200, 30, 30), fmt: str = "JPEG"
) -> bytes:
    """A plain picture; the default size passes make_shards' 64 px minimum side."""
    return encoded(Image.new("RGB", (width, height), color), fmt)


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    """`image` saved in `fmt` (PIL's format name), as the bytes a file or shard member would hold."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def ramp_with_marker(width: int, height: int, marker: tuple[int, int, int, int]) -> Image.Image:
    """A picture with structure: a colour ramp (red grows left to right, green top to bottom, blue falls left
    to right) and a white `marker` box (left, top, right, bottom), so a wrong crop, stretch or flip shows."""
    image = Image.new("RGB", (width, height))
    image.putdata(
        [(255 * x // max(1, width - 1), 255 * y // max(1, height - 1), 255 - 255 * x // max(1, width - 1))
         for y in range(height) for x in range(width)]
    )  # fmt: skip
    image.paste((255, 255, 255), marker)
    return image


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


def tar_bytes(members: Mapping[str, bytes] | Iterable[tuple[str, bytes]]) -> bytes:
    """A tar of `members` in order; a list of (name, data) pairs may repeat a name, a dict cannot."""
    pairs = members.items() if isinstance(members, Mapping) else members
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in pairs:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write_tar(path: Path, members: Mapping[str, bytes] | Iterable[tuple[str, bytes]]) -> None:
    path.write_bytes(tar_bytes(members))


def read_tar(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {member.name: tar.extractfile(member).read() for member in tar.getmembers() if member.isfile()}


def shard_urls(split_dir: Path) -> list[str]:
    """The shard paths a split directory's manifest.json lists, in its order."""
    manifest = json.loads((split_dir / MANIFEST).read_text())
    return [str(split_dir / entry["name"]) for entry in manifest["shards"]]


def read_split(split_dir: Path) -> list[dict]:
    """Every raw sample of a split directory in manifest order, read by plain webdataset (not our reader)."""
    return list(wds.WebDataset(shard_urls(split_dir), shardshuffle=False, empty_check=False))


class CreatesFile:
    """A pickle payload: unpickling it creates `path`, the proof that something executed a shard member."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self) -> tuple:
        return open, (str(self.path), "w")


def png_claiming_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header says width x height: a pixel bomb to any header check, a few bytes on disk."""
    buffer = io.BytesIO()
    Image.new("1", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR data: after the signature, chunk length and type
    data[29:33] = struct.pack(">I", zlib.crc32(data[12:29]))  # PIL checks the chunk CRC (type + data)
    return bytes(data)


def write_hostile_shards(good_dir: Path, out_dir: Path, marker: Path) -> dict[str, int]:
    """Copy the 4 shards of `good_dir` into `out_dir` with broken samples planted; the planted counts by skip reason.

    The first shard is cut in the middle of its 6th sample (the 5 before stay readable); each other shard starts
    with 3 broken samples and carries pickle payloads (.pyd/.pkl/.pth) that would create `marker`, next to a good
    sample: ignored by name, so not counted. The manifest counts every sample as make_shards would (49 in all),
    so at batch 8 with one worker per rank the quota (1 rank: 6 batches = 48 samples; 2 ranks: 3 batches = 24 each)
    exceeds the valid samples any rank can hold (35; two shards hold at most 20): whatever the shard order, each
    worker reads its shards to the end and pads, so every planted sample is read, once per epoch.
    """
    big = image_bytes(300, 300)
    groups = [  # (skip reason, members) per planted sample, one group per shard after the first
        [
            ("truncated_image", {"cut_jpeg.jpg": big[: len(big) // 2], "cut_jpeg.txt": b"a red square"}),
            ("undecodable_image", {"garbage.jpg": b"\xff\xd8 not a jpeg at all", "garbage.txt": b"a red square"}),
            ("missing_image", {"no_image.txt": b"a red square", "no_image.json": b'{"captions": ["a red square"]}'}),
        ],
        [
            ("bad_text_encoding", {"latin1.jpg": image_bytes(), "latin1.txt": "un carré rouge".encode("latin-1")}),
            ("bad_text_encoding", {"binary_text.jpg": image_bytes(), "binary_text.txt": b"\xff\xfe\x00\x80 red"}),
            ("no_caption", {"no_text.jpg": image_bytes()}),
        ],
        [
            ("no_caption", {"punctuation.jpg": image_bytes(), "punctuation.txt": b"  ... !  "}),  # empty once cleaned
            ("too_many_pixels", {"bomb.png": png_claiming_size(10_000, 9_000), "bomb.txt": b"a red square"}),
            # over 2x PIL's own limit PIL refuses first; still counted as a pixel bomb
            ("too_many_pixels", {"huge.png": png_claiming_size(20_000, 20_000), "huge.txt": b"a red square"}),
        ],
    ]
    manifest = json.loads((good_dir / MANIFEST).read_text())
    first, *others = manifest["shards"]
    out_dir.mkdir(parents=True)
    payload = pickle.dumps(CreatesFile(marker))
    for entry, group in zip(others, groups, strict=True):
        members = {name: data for _, sample in group for name, data in sample.items()}
        for index, (name, data) in enumerate(read_tar(good_dir / entry["name"]).items()):
            members[name] = data
            if index == 0:  # within the first good sample's members: same key, skipped by extension
                members |= {f"{name.split('.', 1)[0]}.{ext}": payload for ext in ("pyd", "pkl", "pth")}
        write_tar(out_dir / entry["name"], members)
        entry["num_samples"] += len(group)
    truncated = out_dir / first["name"]
    shutil.copyfile(good_dir / first["name"], truncated)
    with tarfile.open(truncated) as tar:
        infos = tar.getmembers()
    keys = [info.name.split(".", 1)[0] for info in infos]
    sixth = infos[keys.index(list(dict.fromkeys(keys))[5])]  # the first member of the 6th sample
    truncated.write_bytes(truncated.read_bytes()[: sixth.offset_data + sixth.size // 2])
    for entry in manifest["shards"]:
        path = out_dir / entry["name"]
        entry |= {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    manifest |= {
        "num_samples": sum(entry["num_samples"] for entry in manifest["shards"]),
        "bytes": sum(entry["bytes"] for entry in manifest["shards"]),
    }
    write_json_atomic(out_dir / MANIFEST, manifest)
    return dict(Counter(reason for group in groups for reason, _ in group) + Counter(unreadable_shard=1))
