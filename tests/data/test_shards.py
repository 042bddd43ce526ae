"""The shard writer: sample format, manifest, resizing, idempotent reruns, resume, bad input."""

import hashlib
import importlib
import io
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from data_pipeline.make_shards import main as make_shards
from data_pipeline.make_shards import parse_args
from tests.helpers.data import image_bytes, read_split, read_tar, write_coco


def run_shards(root, out, *extra):
    """One split with shards of exactly --shard-samples (no small-split rule, unless `extra` sets --min-shards)."""
    make_shards(
        ["--root", str(root), "--out", str(out), "--splits", "train", "--workers", "1", "--quiet", "--min-shards", "1",
         *extra]
    )  # fmt: skip
    return json.loads((out / "train" / "manifest.json").read_text())


def test_shards_match_manifest_and_carry_the_sample_format(synthetic_shards, synthetic_coco):
    manifest = json.loads((synthetic_shards["train"] / "manifest.json").read_text())
    assert manifest["num_samples"] == 40 and manifest["num_shards"] == 4 and manifest["skipped"] == {}
    annotations = json.loads((synthetic_coco / "annotations/captions_train2017.json").read_text())
    captions = {}
    for a in annotations["annotations"]:
        captions.setdefault(a["image_id"], []).append(a["caption"])
    seen = []
    for entry in manifest["shards"]:
        path = synthetic_shards["train"] / entry["name"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
        assert path.stat().st_size == entry["bytes"]
        samples = list(wds.WebDataset(str(path), shardshuffle=False, empty_check=False))
        assert len(samples) == entry["num_samples"] == 10
        for sample in samples:
            assert "." not in sample["__key__"]
            assert set(sample) >= {"jpg", "txt", "json"}
            meta = json.loads(sample["json"])
            assert set(meta) == {
                "image_id", "captions", "source", "split", "width", "height", "original_size", "sha256"
            }  # fmt: skip
            assert (meta["source"], meta["split"]) == ("synthetic", "train")  # --name, and the split
            assert meta["captions"] == captions[meta["image_id"]]
            assert sample["txt"].decode() == meta["captions"][0]
            assert meta["sha256"] == hashlib.sha256(sample["jpg"]).hexdigest()
            assert Image.open(io.BytesIO(sample["jpg"])).size == (meta["width"], meta["height"]) == (96, 96)
            original = (synthetic_coco / "train2017" / f"{meta['image_id']:012d}.jpg").read_bytes()
            assert sample["jpg"] == original  # small JPEGs keep their bytes
            seen.append(meta["image_id"])
    assert sorted(seen) == sorted(captions)
    assert seen != sorted(seen)  # globally shuffled before sharding


def test_large_images_are_resized_and_non_jpeg_reencoded(tmp_path):
    images = [
        {"id": 1, "file_name": "wide.png", "data": image_bytes(600, 300, fmt="PNG")},
        {"id": 2, "file_name": "small.png", "data": image_bytes(70, 64, fmt="PNG")},  # not resized: side 64
    ]
    write_coco(tmp_path / "coco", "train", images, [(1, "wide"), (2, "small")])
    run_shards(tmp_path / "coco", tmp_path / "out", "--max-size", "64")
    samples = {
        json.loads(s["json"])["image_id"]: s
        for s in wds.WebDataset(str(tmp_path / "out/train/train-000000.tar"), shardshuffle=False)
    }
    wide = Image.open(io.BytesIO(samples[1]["jpg"]))
    assert (wide.format, wide.size) == ("JPEG", (128, 64))
    assert json.loads(samples[1]["json"])["original_size"] == [600, 300]
    assert Image.open(io.BytesIO(samples[2]["jpg"])).format == "JPEG"


def shard_state(directory):
    """Every file's (mtime, sha256), the manifest's by content only (it is rewritten, identically)."""
    return {
        p.name: (0 if p.name == "manifest.json" else p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in directory.iterdir()
    }


def test_rerun_is_idempotent_and_a_partial_run_resumes(synthetic_coco, tmp_path):
    out = tmp_path / "out"
    first = run_shards(synthetic_coco, out, "--shard-samples", "7", "--name", "synthetic")
    before = shard_state(out / "train")
    assert run_shards(synthetic_coco, out, "--shard-samples", "7", "--name", "synthetic") == first
    assert shard_state(out / "train") == before  # nothing rewritten, not even touched

    # an interrupted run: two shards recorded in the progress file, a half-written third, no manifest
    (out / "train/manifest.json").unlink()
    progress = {"options": first["options"], "shards": first["shards"][:2]}
    (out / "train/.progress.json").write_text(json.dumps(progress))
    for entry in first["shards"][2:]:
        (out / "train" / entry["name"]).unlink()
    (out / "train" / (first["shards"][2]["name"] + ".tmp")).write_bytes(b"partial")
    assert run_shards(synthetic_coco, out, "--shard-samples", "7", "--name", "synthetic") == first
    after = shard_state(out / "train")
    assert set(after) == set(before)  # no .tmp or progress file left behind
    for name, (mtime, sha) in after.items():
        assert sha == before[name][1]
        kept = name in {e["name"] for e in first["shards"][:2]} or name == "manifest.json"
        assert (mtime == before[name][0]) == kept, name

    # different options: everything is redone, stale shards removed
    changed = run_shards(synthetic_coco, out, "--shard-samples", "20", "--name", "synthetic")
    assert changed["num_shards"] == 2 and sorted(p.name for p in (out / "train").glob("*.tar")) == [
        "train-000000.tar",
        "train-000001.tar",
    ]


def test_changed_inputs_are_resharded_not_reused(tmp_path):
    images = [{"id": i, "file_name": f"{i}.jpg", "data": image_bytes()} for i in range(3)]
    write_coco(tmp_path / "coco", "train", images, [(i, f"caption {i}") for i in range(3)])
    first = run_shards(tmp_path / "coco", tmp_path / "out")
    write_coco(tmp_path / "coco", "train", images, [(i, f"new caption {i}") for i in range(3)])
    second = run_shards(tmp_path / "coco", tmp_path / "out")
    assert first["shards"][0]["sha256"] != second["shards"][0]["sha256"]
    sample = next(iter(wds.WebDataset(str(tmp_path / "out/train/train-000000.tar"), shardshuffle=False)))
    assert sample["txt"].decode().startswith("new caption")


def test_each_kind_of_bad_input_is_skipped_and_counted(tmp_path):
    good = image_bytes()
    images = [
        {"id": 1, "file_name": "ok1.jpg", "data": good},
        {"id": 2, "file_name": "ok2.jpg", "data": image_bytes(color=(0, 255, 0))},
        {"id": 3, "file_name": "missing.jpg", "data": None},
        {"id": 4, "file_name": "truncated.jpg", "data": image_bytes(300, 300)[:400]},
        {"id": 5, "file_name": "garbage.jpg", "data": b"not an image at all"},
        {"id": 6, "file_name": "bomb.png", "data": image_bytes(200, 200, fmt="PNG")},
        {"id": 7, "file_name": "nocaption.jpg", "data": good},
        {"id": 1, "file_name": "duplicate.jpg", "data": good},
    ]
    captions = [(1, "one"), (2, "two"), (2, "   "), (2, "bad \udc80 text"), (3, "x"), (4, "x"), (5, "x"), (6, "x")]
    write_coco(tmp_path / "coco", "train", images, captions)
    manifest = run_shards(tmp_path / "coco", tmp_path / "out", "--max-pixels", "10000")
    assert manifest["num_samples"] == 2
    assert manifest["skipped"] == {
        "duplicate_id": 1,
        "empty_caption": 1,
        "missing_image": 1,
        "no_caption": 1,
        "non_utf8_caption": 1,
        "too_many_pixels": 1,
        "truncated_image": 1,
        "undecodable_image": 1,
    }


def cli(capsys, *args) -> tuple[int, str]:
    """Run the CLI entry point in-process; returns (exit status, stderr)."""
    try:
        make_shards([*args, "--workers", "1", "--quiet"])
        status = 0
    except SystemExit as exit_:
        status = exit_.code
    return status, capsys.readouterr().err


def shard_sizes(manifest: dict) -> list[int]:
    return [entry["num_samples"] for entry in manifest["shards"]]


def test_shard_bytes_closes_a_shard_by_size_and_shard_samples_by_count(tmp_path):
    """A shard closes once its samples' member bytes (tar headers aside) reach --shard-bytes, or at
    --shard-samples samples, whichever comes first."""
    images = [{"id": 10 + i, "file_name": f"{i}.jpg", "data": image_bytes(color=(40 * i, 90, 0))} for i in range(7)]
    write_coco(tmp_path / "coco", "train", images, [(10 + i, f"caption number {i}") for i in range(7)])
    one_each = run_shards(tmp_path / "coco", tmp_path / "one_each", "--shard-bytes", "1")
    assert shard_sizes(one_each) == [1] * 7
    payloads = [sum(map(len, read_tar(tmp_path / "one_each/train" / e["name"]).values())) for e in one_each["shards"]]
    bound = sum(payloads[:3])  # reached exactly by the third sample
    expected, filled, count = [], 0, 0  # the rule, on the sizes in shuffled order (the same in every run)
    for payload in payloads:
        filled, count = filled + payload, count + 1
        if filled >= bound:
            expected, filled, count = [*expected, count], 0, 0
    expected += [count] if count else []
    assert expected[0] == 3 and len(expected) >= 2
    assert shard_sizes(run_shards(tmp_path / "coco", tmp_path / "by_bytes", "--shard-bytes", str(bound))) == expected
    both = run_shards(tmp_path / "coco", tmp_path / "both", "--shard-bytes", str(bound), "--shard-samples", "2")
    assert shard_sizes(both) == [2, 2, 2, 1]  # the count closes them first


def test_seed_sets_the_global_shuffle(synthetic_shards, synthetic_coco, tmp_path):
    """--seed (SHARD_SEED, default 0) orders the samples before sharding: the same seed gives the same order
    (the session's shards were written without --seed), another seed another order of the same samples."""
    default = [sample["__key__"] for sample in read_split(synthetic_shards["train"])]
    orders = {}
    for seed in (0, 1):
        run_shards(synthetic_coco, tmp_path / str(seed), "--name", "synthetic", "--shard-samples", "40", "--seed",
                   str(seed))  # fmt: skip
        orders[seed] = [sample["__key__"] for sample in read_split(tmp_path / str(seed) / "train")]
    assert orders[0] == default
    assert orders[1] != default and sorted(orders[1]) == sorted(default)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_passes_the_shard_variables_to_make_shards():
    """docs/data.md's table: SHARD_SAMPLES / SHARD_BYTES / SHARD_SEED reach make_shards, with the stated defaults."""
    repository = Path(__file__).resolve().parents[2]

    def parsed(*variables: str):
        result = subprocess.run(
            ["make", "-n", "-s", "-C", str(repository), "shards", "SOURCE=coco", "ROOT=/nowhere", *variables],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        commands = result.stdout.replace("\\\n", " ").splitlines()  # a recipe's continued lines, joined
        (line,) = [command for command in commands if "data_pipeline.make_shards" in command]
        words = shlex.split(line)
        return parse_args(words[words.index("data_pipeline.make_shards") + 1 :])

    defaults = parsed()
    assert (defaults.shard_samples, defaults.shard_bytes, defaults.seed) == (500, 500_000_000, 0)
    assert (defaults.min_shards, defaults.min_side, defaults.holdout_fraction) == (8, 64, 0.05)
    help_defaults = parse_args(["--root", "/nowhere"])  # one default: the Makefile's is make_shards' own
    for option in (
        "shard_samples",
        "shard_bytes",
        "min_shards",
        "min_side",
        "max_size",
        "max_pixels",
        "holdout_fraction",
    ):
        assert getattr(defaults, option) == getattr(help_defaults, option), option
    chosen = parsed("SHARD_SAMPLES=7", "SHARD_BYTES=12345", "SHARD_SEED=3", "MIN_SHARDS=2", "MIN_SIDE=16")
    assert (chosen.shard_samples, chosen.shard_bytes, chosen.seed) == (7, 12345, 3)
    assert (chosen.min_shards, chosen.min_side) == (2, 16)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_shards_of_a_real_source_trains_its_own_tokenizer():
    """A real source's train split gets data/tokenizer-DATASET (the synthetic 168-token vocabulary would split
    real words into characters); no train split, no tokenizer."""
    repository = Path(__file__).resolve().parents[2]

    def tokenizer_commands(*variables: str) -> list[str]:
        result = subprocess.run(
            ["make", "-n", "-s", "-C", str(repository), "shards", "SOURCE=coco", "ROOT=/nowhere", *variables],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        commands = result.stdout.replace("\\\n", " ").splitlines()
        return [shlex.split(c) for c in commands if "data_pipeline.train_tokenizer" in c]

    (command,) = tokenizer_commands("DATASET=mycoco", "SPLITS=train,val")
    assert command[command.index("--shards") + 1] == "data/shards/mycoco/train"
    assert command[command.index("--out") + 1] == "data/tokenizer-mycoco"
    assert tokenizer_commands("SPLITS=val") == []


def test_cli_fails_with_one_line_when_nothing_is_valid_or_too_much_is_bad(tmp_path, capsys):
    write_coco(tmp_path / "empty", "train", [{"id": 1, "file_name": "a.jpg", "data": None}], [(1, "x")])
    status, err = cli(capsys, "--root", str(tmp_path / "empty"), "--out", str(tmp_path / "o1"), "--splits", "train")
    assert status == 1
    assert err == (  # the path the source names, and that no image is there at all
        f"error: no valid sample in split 'train' (skipped: missing_image=1; e.g. {tmp_path}/empty/train2017/a.jpg "
        f"is missing; no image file exists under {tmp_path}/empty); check --root and the layout\n"
    )

    images = [{"id": i, "file_name": f"{i}.jpg", "data": image_bytes() if i < 3 else None} for i in range(4)]
    write_coco(tmp_path / "half", "train", images, [(i, "x") for i in range(4)])
    args = ["--root", str(tmp_path / "half"), "--out", str(tmp_path / "o2"), "--splits", "train"]
    assert cli(capsys, *args, "--max-bad-fraction", "0.5")[0] == 0
    status, err = cli(capsys, *args, "--max-bad-fraction", "0.2")
    assert status == 1
    assert err == (
        f"error: split 'train': 25.0% of images skipped (missing_image=1; e.g. {tmp_path}/half/train2017/3.jpg is "
        f"missing; {tmp_path}/half/train2017/0.jpg exists) > --max-bad-fraction 0.2; fix the data or raise the bound\n"
    )

    status, err = cli(capsys, "--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o3"))
    assert status == 1
    assert err == (
        f"error: {tmp_path}/nowhere/annotations/captions_train2017.json not found; "
        "point --root at a COCO directory with annotations/\n"
    )


def test_cli_help_runs_as_a_module():
    result = subprocess.run(
        [sys.executable, "-m", "data_pipeline.make_shards", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "--shard-samples" in result.stdout
    help_text = " ".join(result.stdout.split())  # the defaults the Makefile and docs/data.md state
    for default in ("(default: 500)", "(default: 8)", "(default: 64)", "(default: 0.05)", "(default: train,val)"):
        assert default in help_text, default


@pytest.mark.parametrize("module", ["train_tokenizer", "synthetic"])
def test_other_cli_help(module, capsys):
    main = importlib.import_module(f"data_pipeline.{module}").main
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0 and "--out" in capsys.readouterr().out
