"""Every source layout on tiny fixtures, sharded through make_shards and read back with plain webdataset."""

import json

import datasets
import pytest

from data_pipeline import DataError
from data_pipeline.make_shards import main as make_shards
from data_pipeline.manifest import read_manifest
from data_pipeline.sources.coco import read_coco
from data_pipeline.sources.flickr30k import read_flickr30k
from data_pipeline.sources.hf import read_hf
from data_pipeline.sources.karpathy import read_karpathy
from tests.helpers.data import image_bytes, read_split, write_coco


def shard_and_read(tmp_path, *args: str) -> dict[str, list[dict]]:
    out = tmp_path / "out"
    make_shards([*args, "--out", str(out), "--workers", "1", "--quiet"])
    result = {}
    for split_dir in sorted(p for p in out.iterdir() if p.is_dir()):
        samples = [
            {"key": s["__key__"], "txt": s["txt"].decode(), "meta": json.loads(s["json"])}
            for s in read_split(split_dir)
        ]
        assert len(samples) == read_manifest(split_dir)["num_samples"]
        result[split_dir.name] = sorted(samples, key=lambda s: str(s["meta"]["image_id"]))
    return result


def test_coco_official_layout_groups_captions_per_image(tmp_path):
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "data": image_bytes()} for i in (7, 9)]
    write_coco(tmp_path, "train", images, [(7, "a dog"), (9, "a cat"), (7, "a brown dog")])
    split = read_coco(tmp_path, "train")
    assert {r.image_id: r.captions for r in split.records} == {"7": ("a dog", "a brown dog"), "9": ("a cat",)}
    samples = shard_and_read(tmp_path, "--source", "coco", "--root", str(tmp_path), "--splits", "train")["train"]
    assert [s["meta"]["image_id"] for s in samples] == [7, 9]
    assert samples[0]["txt"] == "a dog" and samples[0]["meta"]["captions"] == ["a dog", "a brown dog"]
    assert samples[0]["key"] == "coco_train_7"
    with pytest.raises(DataError) as error:
        read_coco(tmp_path, "val")
    assert str(error.value) == (
        f"{tmp_path}/annotations/captions_val2017.json not found; point --root at a COCO directory with annotations/"
    )


def karpathy_document(filepath: str | None) -> dict:
    entries = []
    for i, split in enumerate(["train", "restval", "val", "test"]):
        entry = {"filename": f"img{i}.jpg", "imgid": i, "split": split, "sentences": [{"raw": f"caption {i}"}]}
        if filepath is not None:
            entry.update(filepath=filepath, cocoid=100 + i)
        entries.append(entry)
    return {"images": entries}


def test_coco_karpathy_split_uses_train_plus_restval(tmp_path):
    (tmp_path / "val2014").mkdir()
    for i in range(4):
        (tmp_path / "val2014" / f"img{i}.jpg").write_bytes(image_bytes())
    (tmp_path / "dataset_coco.json").write_text(json.dumps(karpathy_document("val2014")))
    assert [r.image_id for r in read_karpathy(tmp_path / "dataset_coco.json", tmp_path, "train").records] == [
        "100",
        "101",
    ]
    samples = shard_and_read(
        tmp_path, "--source", "coco", "--root", str(tmp_path),
        "--karpathy-json", str(tmp_path / "dataset_coco.json"), "--splits", "train,val,test",
    )  # fmt: skip
    assert {split: [s["meta"]["image_id"] for s in v] for split, v in samples.items()} == {
        "train": [100, 101],
        "val": [102],
        "test": [103],
    }
    for split, split_samples in samples.items():  # each sample's json names its dataset and split
        assert [(s["meta"]["source"], s["meta"]["split"]) for s in split_samples] == [("coco", split)] * len(
            split_samples
        )


def test_flickr30k_karpathy_layout(tmp_path):
    (tmp_path / "flickr30k-images").mkdir()
    for i in range(4):
        (tmp_path / "flickr30k-images" / f"img{i}.jpg").write_bytes(image_bytes())
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(karpathy_document(None)))
    split = read_flickr30k(tmp_path, "test", tmp_path / "dataset_flickr30k.json")
    assert [(r.image_id, r.captions) for r in split.records] == [("3", ("caption 3",))]


@pytest.mark.parametrize("caption_file", ["results_20130124.token", "results.csv"])
def test_flickr30k_plain_caption_files(tmp_path, caption_file):
    (tmp_path / "flickr30k-images").mkdir()
    for name in ("1000.jpg", "2000.jpg"):
        (tmp_path / "flickr30k-images" / name).write_bytes(image_bytes())
    if caption_file.endswith(".token"):
        text = b"1000.jpg#0\tTwo dogs run .\n1000.jpg#1\tDogs running\n2000.jpg#0\tA bike\n2000.jpg#1\tbad \xff\xfe\n"
    else:
        text = b"image_name| comment_number| comment\n1000.jpg| 0| Two dogs run .\n1000.jpg| 1| Dogs running\n"
        text += b"2000.jpg| 0| A bike\n2000.jpg| 1| bad \xff\xfe\n"
    (tmp_path / caption_file).write_bytes(text)
    split = read_flickr30k(tmp_path, "train")  # both ids hash into train (test_real_layouts checks the rule)
    assert {r.image_id: r.captions for r in split.records} == {
        "1000": ("Two dogs run .", "Dogs running"),
        "2000": ("A bike",),
    }
    assert split.skipped == {"non_utf8_caption": 1}
    samples = shard_and_read(
        tmp_path, "--source", "flickr30k", "--name", "f30k", "--root", str(tmp_path), "--splits", "train"
    )
    assert [s["meta"]["captions"] for s in samples["train"]] == [["Two dogs run .", "Dogs running"], ["A bike"]]
    # --name (DATASET) is the key prefix and the json's source
    assert [(s["key"], s["meta"]["source"], s["meta"]["split"]) for s in samples["train"]] == [
        ("f30k_train_1000", "f30k", "train"),
        ("f30k_train_2000", "f30k", "train"),
    ]


def test_hf_dataset_from_disk_with_string_and_list_captions(tmp_path):
    features = datasets.Features(
        {
            "picture": datasets.Image(),
            "text": datasets.Sequence(datasets.Value("string")),
            "uid": datasets.Value("int64"),
        }
    )
    rows = {
        "picture": [{"bytes": image_bytes(color=(0, 0, 255)), "path": None}, {"bytes": image_bytes(), "path": None}],
        "text": [["a blue square", "blue"], ["a red square"]],
        "uid": [11, 12],
    }
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(
        str(tmp_path / "hf")
    )
    split = read_hf(str(tmp_path / "hf"), "train", image_column="picture", caption_column="text", id_column="uid")
    assert [(r.image_id, r.captions) for r in split.records] == [
        ("11", ("a blue square", "blue")),
        ("12", ("a red square",)),
    ]
    samples = shard_and_read(
        tmp_path, "--source", "hf", "--hf-dataset", str(tmp_path / "hf"), "--image-column", "picture",
        "--caption-column", "text", "--id-column", "uid", "--splits", "train",
    )  # fmt: skip
    assert [s["meta"]["image_id"] for s in samples["train"]] == [11, 12]
    single = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"image": [image_bytes()], "caption": ["one caption"]})}
    )
    single.save_to_disk(str(tmp_path / "hf_single"))
    assert read_hf(str(tmp_path / "hf_single"), "train").records[0].captions == ("one caption",)
    with pytest.raises(DataError) as error:
        read_hf(str(tmp_path / "hf_single"), "train", caption_column="nope")
    assert str(error.value) == (
        f"column 'nope' not in {tmp_path / 'hf_single'} (['image', 'caption']); fix the column option"
    )


def test_synthetic_set_is_deterministic_and_captions_distinguish_images(synthetic_coco, tmp_path):
    from data_pipeline.synthetic import generate

    generate(tmp_path, train=0, val=12, seed=0, size=96)
    assert (tmp_path / "annotations/captions_val2017.json").read_bytes() == (
        synthetic_coco / "annotations/captions_val2017.json"
    ).read_bytes()
    for name in ("000010000001.jpg", "000010000012.jpg"):
        assert (tmp_path / "val2017" / name).read_bytes() == (synthetic_coco / "val2017" / name).read_bytes()
    split = read_coco(synthetic_coco, "train")
    assert all(len(r.captions) == 5 for r in split.records)
    assert len({r.captions[0] for r in split.records}) >= 38  # 40 images, (almost) all described differently
