"""Data as users bring it: splits without leaks, small and cut images, the Karpathy file on both COCO
layouts, small splits that still feed several ranks, no silent drops, HF split names (issue 15)."""

import hashlib
import io
import json
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
from PIL import Image

from data_pipeline import DataError
from data_pipeline.images import DEFAULT_MIN_SIDE
from data_pipeline.make_shards import main as make_shards
from data_pipeline.manifest import read_manifest
from data_pipeline.shards import check_shards
from pretrain.train.recipe import recipe_from_dict
from pretrain.train.task import build_caption_data
from tests.helpers.data import image_bytes, read_split, write_coco, write_tar


def shard(tmp_path: Path, *args: str) -> Path:
    out = tmp_path / "out"
    make_shards([*args, "--out", str(out), "--workers", "1", "--quiet"])
    return out


def image_ids(split_dir: Path) -> list:
    return sorted(json.loads(sample["json"])["image_id"] for sample in read_split(split_dir))


def noise_jpeg(size: int = 200) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((size, size), 60).convert("RGB").save(buffer, format="JPEG")
    return buffer.getvalue()


def write_flickr_csv(root: Path, names: list[str], extra_lines: bytes = b"", images: str = "flickr30k-images") -> None:
    (root / images).mkdir(parents=True)
    lines = [b"image_name| comment_number| comment"]
    for name in names:
        (root / images / name).write_bytes(image_bytes())
        lines += [f"{name}| {n}| caption {n} of {name}".encode() for n in range(2)]
    (root / "results.csv").write_bytes(b"\n".join(lines) + b"\n" + extra_lines)


def test_flickr_plain_captions_split_disjointly_by_image_id_hash(tmp_path):
    names = [f"{1000 + i}.jpg" for i in range(200)]
    write_flickr_csv(tmp_path / "f30k", names)
    root = ["--source", "flickr30k", "--root", str(tmp_path / "f30k"), "--holdout-fraction", "0.1"]
    out = shard(tmp_path, *root, "--splits", "train,val,test")
    ids = {split: image_ids(out / split) for split in ("train", "val", "test")}
    position = {n: int(hashlib.sha256(str(1000 + n).encode()).hexdigest(), 16) / 2**256 for n in range(200)}
    assert ids == {  # the rule stated in each manifest, computed here independently
        "val": sorted(1000 + n for n, p in position.items() if p < 0.1),
        "test": sorted(1000 + n for n, p in position.items() if 0.1 <= p < 0.2),
        "train": sorted(1000 + n for n, p in position.items() if p >= 0.2),
    }
    assert 0 < len(ids["val"]) < 40 and 0 < len(ids["test"]) < 40
    assert read_manifest(out / "val")["options"]["split_rule"] == {
        "by": "sha256(image_id) / 2**256", "val": [0.0, 0.1], "test": [0.1, 0.2], "train": [0.2, 1.0],
    }  # fmt: skip
    alone = shard(tmp_path / "alone", *root, "--splits", "train")  # the same train set whatever else is asked
    assert image_ids(alone / "train") == ids["train"]
    with pytest.raises(SystemExit):
        shard(tmp_path / "restval", *root, "--splits", "restval")


def test_flickr_as_kaggle_unpacks_it_is_read(tmp_path):
    """Kaggle's Flickr30k: flickr30k_images/ holds results.csv and the images' own flickr30k_images/."""
    root = tmp_path / "flickr30k_images"
    write_flickr_csv(root, ["1000092795.jpg", "10002456.jpg"], images="flickr30k_images")
    out = shard(tmp_path, "--source", "flickr30k", "--root", str(root), "--splits", "train")  # both hash >= 0.1
    assert image_ids(out / "train") == [10002456, 1000092795]

def test_flickr_karpathy_file_keeps_its_own_splits(tmp_path):
    (tmp_path / "flickr30k-images").mkdir()
    entries = []
    for i, split in enumerate(["train", "train", "val", "test"]):
        (tmp_path / "flickr30k-images" / f"{i}.jpg").write_bytes(image_bytes())
        entries.append({"filename": f"{i}.jpg", "imgid": i, "split": split, "sentences": [{"raw": f"c {i}"}]})
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": entries}))
    out = shard(
        tmp_path, "--source", "flickr30k", "--root", str(tmp_path),
        "--karpathy-json", str(tmp_path / "dataset_flickr30k.json"), "--splits", "train,val,test",
    )  # fmt: skip
    assert {split: image_ids(out / split) for split in ("train", "val", "test")} == {
        "train": [0, 1], "val": [2], "test": [3]
    }  # fmt: skip
    assert read_manifest(out / "train")["options"]["split_rule"] is None


def test_a_saved_single_hf_dataset_is_split_by_id_hash(tmp_path):
    rows = {"image": [image_bytes()] * 60, "caption": [f"c{i}" for i in range(60)], "uid": list(range(500, 560))}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "hf"))
    args = ["--source", "hf", "--hf-dataset", str(tmp_path / "hf"), "--id-column", "uid", "--holdout-fraction", "0.2"]
    out = shard(tmp_path, *args, "--splits", "train,val,test")
    ids = [image_ids(out / split) for split in ("train", "val", "test")]
    assert sorted(sum(ids, [])) == list(range(500, 560))  # every row once
    position = {i: int(hashlib.sha256(str(i).encode()).hexdigest(), 16) / 2**256 for i in range(500, 560)}
    assert ids[1] == [i for i, p in position.items() if p < 0.2] and len(ids[1]) > 0


def test_coco_official_2014_release_is_read(tmp_path):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "val2014").mkdir()
    (root / "val2014" / "COCO_val2014_000000000042.jpg").write_bytes(image_bytes())
    document = {
        "images": [{"id": 42, "file_name": "COCO_val2014_000000000042.jpg"}],
        "annotations": [{"id": 1, "image_id": 42, "caption": "a kite"}],
    }
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps(document))
    out = shard(tmp_path, "--root", str(root), "--splits", "val")
    assert image_ids(out / "val") == [42]


def test_small_truncated_and_undecodable_images_are_counted_apart(tmp_path):
    cut = noise_jpeg()
    images = [
        {"id": 1, "file_name": "ok.jpg", "data": image_bytes()},
        {"id": 2, "file_name": "tiny.jpg", "data": image_bytes(8, 8)},
        {"id": 3, "file_name": "cut.jpg", "data": cut[: len(cut) // 2]},
        {"id": 4, "file_name": "garbage.jpg", "data": b"no image at all"},
    ]
    write_coco(tmp_path / "coco", "train", images, [(i, f"caption {i}") for i in range(1, 5)])
    out = shard(tmp_path, "--root", str(tmp_path / "coco"), "--splits", "train")
    manifest = read_manifest(out / "train")
    assert image_ids(out / "train") == [1]
    assert manifest["skipped"] == {"image_too_small": 1, "truncated_image": 1, "undecodable_image": 1}
    assert manifest["options"]["min_side"] == 64
    lower = shard(tmp_path / "lower", "--root", str(tmp_path / "coco"), "--splits", "train", "--min-side", "8")
    assert image_ids(lower / "train") == [1, 2]


def test_the_recipe_skips_small_images_in_shards_make_shards_did_not_write(tmp_path, tokenizer):
    """Shards from another writer (img2dataset) may hold thumbnails; data.min_side drops them in training."""
    images = {"ok0": image_bytes(), "tiny": image_bytes(8, 8), "ok1": image_bytes(), "ok2": image_bytes()}
    write_tar(tmp_path / "other.tar", [m for key, data in images.items() for m in
                                       ((f"{key}.jpg", data), (f"{key}.txt", b"a red square"))])
    data = {"train": str(tmp_path / "other.tar"), "val": None, "num_workers": 0, "max_bad_fraction": 1.0}
    recipe = recipe_from_dict({"data": data})
    assert recipe.data.min_side == DEFAULT_MIN_SIDE == 64  # the default make shards' MIN_SIDE has
    setup = SimpleNamespace(recipe=recipe, model_config=SimpleNamespace(image_size=32), tokenizer=tokenizer)
    recipe.schedule.micro_batch_size = 4  # one batch: every sample is read, the skipped one padded
    loader, _ = build_caption_data(setup, rank=0, world=1)
    assert {key for batch in loader for key in batch["keys"]} == {"ok0", "ok1", "ok2"}
    assert loader.skip_counts() == {"image_too_small": 1}

def karpathy_coco(path: Path) -> None:
    """dataset_coco.json as released: 2014 paths and names; image 3 is in val2014 but train2017."""
    entries = [
        {"filepath": "train2014", "filename": "COCO_train2014_000000000001.jpg", "cocoid": 1, "split": "train"},
        {"filepath": "val2014", "filename": "COCO_val2014_000000000002.jpg", "cocoid": 2, "split": "restval"},
        {"filepath": "val2014", "filename": "COCO_val2014_000000000003.jpg", "cocoid": 3, "split": "val"},
        {"filepath": "val2014", "filename": "COCO_val2014_000000000004.jpg", "cocoid": 4, "split": "test"},
    ]
    for n, entry in enumerate(entries):
        entry |= {"imgid": n, "sentences": [{"raw": f"caption {entry['cocoid']}"}]}
    path.write_text(json.dumps({"images": entries}))


@pytest.mark.parametrize("layout", ["2014", "2017"])
def test_karpathy_coco_file_reads_the_2014_and_the_2017_layout(tmp_path, layout):
    root = tmp_path / "coco"
    folders = (
        {1: "train", 2: "val", 3: "val", 4: "val"} if layout == "2014" else {1: "train", 2: "val", 3: "train", 4: "val"}
    )
    for cocoid, folder in folders.items():
        name = f"COCO_{folder}2014_{cocoid:012d}.jpg" if layout == "2014" else f"{cocoid:012d}.jpg"
        (root / f"{folder}{layout}").mkdir(parents=True, exist_ok=True)
        (root / f"{folder}{layout}" / name).write_bytes(image_bytes())
    karpathy_coco(tmp_path / "dataset_coco.json")
    out = shard(
        tmp_path, "--source", "coco", "--root", str(root), "--karpathy-json", str(tmp_path / "dataset_coco.json"),
        "--splits", "train,val,test",
    )  # fmt: skip
    assert {split: image_ids(out / split) for split in ("train", "val", "test")} == {
        "train": [1, 2], "val": [3], "test": [4]
    }  # fmt: skip
    assert all(read_manifest(out / split)["skipped"] == {} for split in ("train", "val", "test"))


def test_missing_karpathy_images_name_an_expected_and_an_existing_path(tmp_path, capsys):
    (tmp_path / "coco" / "images").mkdir(parents=True)
    (tmp_path / "coco" / "images" / "elsewhere.jpg").write_bytes(image_bytes())
    karpathy_coco(tmp_path / "dataset_coco.json")
    with pytest.raises(SystemExit):
        shard(
            tmp_path, "--source", "coco", "--root", str(tmp_path / "coco"),
            "--karpathy-json", str(tmp_path / "dataset_coco.json"), "--splits", "val",
        )  # fmt: skip
    assert capsys.readouterr().err == (
        f"error: no valid sample in split 'val' (skipped: missing_image=1; e.g. "
        f"{tmp_path}/coco/val2014/COCO_val2014_000000000003.jpg is missing; {tmp_path}/coco/images/elsewhere.jpg "
        f"exists); check --root and the layout\n"
    )


def test_a_300_image_split_feeds_two_ranks_and_a_tiny_one_warns(tmp_path, capsys):
    images = [{"id": i, "file_name": f"{i}.jpg", "data": image_bytes(color=(i % 256, 80, 0))} for i in range(300)]
    write_coco(tmp_path / "coco", "train", images, [(i, f"caption {i}") for i in range(300)])
    out = shard(tmp_path, "--root", str(tmp_path / "coco"), "--splits", "train")  # the default shard options
    manifest = read_manifest(out / "train")
    assert [entry["num_samples"] for entry in manifest["shards"]] == [37] * 8 + [4]  # 300 // 8 a shard
    assert len(check_shards(str(out / "train"), world_size=2, num_workers=1).shards) == 9
    assert "warning" not in capsys.readouterr().err

    write_coco(tmp_path / "few", "train", images[:5], [(i, f"caption {i}") for i in range(5)])
    out = shard(tmp_path / "few", "--root", str(tmp_path / "few"), "--splits", "train")
    assert read_manifest(out / "train")["num_shards"] == 5
    assert capsys.readouterr().err == (
        "warning: train has 5 shards, fewer than --min-shards 8: epoch-mode training on it can use at most 5 "
        "ranks x workers (or use mode: resampled)\n"
    )


def test_silent_drops_are_counted(tmp_path):
    images = [{"id": i, "file_name": f"{i}.jpg", "data": image_bytes()} for i in (1, 2)]
    write_coco(tmp_path / "coco", "train", images, [(1, "one"), (2, "two"), (99, "no such image"), (99, "again")])
    out = shard(tmp_path, "--root", str(tmp_path / "coco"), "--splits", "train")
    assert read_manifest(out / "train")["skipped"] == {"caption_without_image": 2}

    # a real results.csv line lacks the second separator; another line holds no caption at all
    names = [f"{n}.jpg" for n in range(3000, 3040)]
    extra = f"{names[0]}| 4 A dog runs .\n{names[1]}|\nno separator here\n".encode()
    write_flickr_csv(tmp_path / "f30k", names, extra)
    root = ["--source", "flickr30k", "--root", str(tmp_path / "f30k")]
    out = shard(tmp_path / "f", *root, "--splits", "train,val,test")
    manifests = {split: read_manifest(out / split) for split in ("train", "val", "test")}
    samples = {json.loads(s["json"])["image_id"]: json.loads(s["json"]) for d in manifests for s in read_split(out / d)}
    assert samples[3000]["captions"] == ["caption 0 of 3000.jpg", "caption 1 of 3000.jpg", "A dog runs ."]
    assert len(samples) == 40  # every image in exactly one split
    # "3001.jpg|" counts in 3001's split, the line naming no image in train: 2 in all
    assert sum(m["skipped"].get("unparseable_line", 0) for m in manifests.values()) == 2
    assert manifests["train"]["skipped"]["unparseable_line"] >= 1


def test_hf_split_names_follow_the_dataset_and_every_split_is_checked_first(tmp_path):
    def part(ids):
        return datasets.Dataset.from_dict({"image": [image_bytes()] * len(ids), "caption": [f"c{i}" for i in ids]})

    datasets.DatasetDict({"train": part([0, 1]), "validation": part([2])}).save_to_disk(str(tmp_path / "hf"))
    out = shard(tmp_path, "--source", "hf", "--hf-dataset", str(tmp_path / "hf"), "--splits", "train,val")
    assert [read_manifest(out / s)["num_samples"] for s in ("train", "val")] == [2, 1]
    assert [json.loads(s["json"])["captions"] for s in read_split(out / "val")] == [["c2"]]

    with pytest.raises(SystemExit):
        shard(tmp_path / "t", "--source", "hf", "--hf-dataset", str(tmp_path / "hf"), "--splits", "train,test")
    assert not (tmp_path / "t" / "out" / "train").exists()  # refused before the train split was written
    from data_pipeline.sources.hf import read_hf

    with pytest.raises(DataError) as error:
        read_hf(str(tmp_path / "hf"), "test")
    assert str(error.value) == f"{tmp_path / 'hf'} has splits ['train', 'validation'], not 'test'; fix --splits"
