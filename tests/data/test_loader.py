"""The training loader: spec checks, batch contract, exactly-once epochs, exact resume, safety, bad data."""

import gc
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import torch
from PIL import Image

from data_pipeline import DataError, check_shards, make_train_loader
from data_pipeline.epoch_plan import epoch_quotas, round_robin_position
from data_pipeline.samples import image_id_of
from tests.helpers.data import CLIP_MEAN, CLIP_STD, CreatesFile, encoded, image_bytes, read_split, write_tar

BATCH_KEYS = {"pixel_values", "input_ids", "attention_mask", "mlm_input_ids", "mlm_labels", "image_ids", "keys"}


def loader(spec, tokenizer, **overrides):
    options = dict(batch_size=5, rank=0, world_size=1, num_workers=0, seed=0, image_size=32, max_len=24)
    return make_train_loader(spec, tokenizer, **{**options, **overrides})


def train_keys(shard_dir) -> list[str]:
    return [s["__key__"] for s in read_split(shard_dir)]


def test_check_shards_resolves_specs(synthetic_shards):
    train = synthetic_shards["train"]
    assert check_shards(str(train), world_size=2, num_workers=2).num_samples == 40
    pattern = str(train / "train-{000000..000002}.tar")
    assert [s.num_samples for s in check_shards(pattern, world_size=1, num_workers=1).shards] == [10, 10, 10]
    assert (
        len(check_shards([str(train / "train-000000.tar"), str(train / "*.tar")], world_size=1, num_workers=0).shards)
        == 5
    )
    weighted = check_shards(f"{train}::0.7,{pattern}::0.3", world_size=4, num_workers=4, mode="resampled")
    assert [(len(s.shards), s.weight) for s in weighted.sources] == [(4, 0.7), (3, 0.3)]


def write_manifest_of_a_missing_shard(directory) -> str:
    directory.mkdir()
    (directory / "manifest.json").write_text(json.dumps({"shards": [{"name": "gone.tar", "num_samples": 3}]}))
    return str(directory)


@pytest.mark.parametrize(
    ("make_spec", "options", "message"),
    [
        (lambda d, t: str(d / "train-000009.tar"), {},
         "1 of 1 shards in '{d}/train-000009.tar' are missing (e.g. {d}/train-000009.tar); "
         "check the spec or rerun make_shards"),
        (lambda d, t: write_manifest_of_a_missing_shard(t / "partial"), {},
         "1 shards of {t}/partial/manifest.json are missing (e.g. {t}/partial/gone.tar); rerun make_shards"),
        (lambda d, t: str(d / "nothing-*.tar"), {},
         "shard pattern '{d}/nothing-*.tar' matches no file; check the path"),
        (lambda d, t: str(d.parent), {},
         "{d.parent} has no manifest.json; run make_shards into it or give a shard pattern"),
        (lambda d, t: str(d), {"world_size": 2, "num_workers": 3},
         "4 shards cannot feed 2 ranks x 3 workers in epoch mode; write at least that many shards "
         "(make shards MIN_SHARDS=6), use fewer workers, or mode='resampled'"),
        (lambda d, t: f"{d}::0.5", {},
         "source weights only apply in mode='resampled'; drop the ::WEIGHT suffixes or switch mode"),
        (lambda d, t: str(d), {"mode": "sequential"},
         "loader mode 'sequential' is not one of ('epoch', 'resampled'); fix the data mode option"),
        (lambda d, t: [], {}, "shard spec [] is empty; give a directory, pattern or list of shards"),
    ],
)  # fmt: skip
def test_check_shards_rejects_bad_specs_with_one_line(synthetic_shards, tmp_path, make_spec, options, message):
    """The whole line: the problem and the fix (a substring such as the path would match any error)."""
    arguments = {"world_size": 1, "num_workers": 1, **options}
    train = synthetic_shards["train"]
    with pytest.raises(DataError) as error:
        check_shards(make_spec(train, tmp_path), **arguments)
    assert str(error.value) == message.format(d=train, t=tmp_path)


def test_batches_follow_the_contract(synthetic_shards, tokenizer):
    train = loader(str(synthetic_shards["train"]), tokenizer, mlm_probability=0.5)
    batches = list(train)
    assert len(batches) == len(train) == 8
    batch = batches[0]
    assert set(batch) == BATCH_KEYS
    assert batch["pixel_values"].shape == (5, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    # CLIP-normalised uint8 pixels: undone with the literal constants they are whole numbers in 0..255 again
    # (x/255, or ImageNet's statistics, would leave fractions)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float64).view(1, 3, 1, 1) * 255
    std = torch.tensor(CLIP_STD, dtype=torch.float64).view(1, 3, 1, 1) * 255
    pixels = batch["pixel_values"].double() * std + mean
    assert (pixels - pixels.round()).abs().max() < 1e-3
    assert pixels.round().min() >= 0 and pixels.round().max() <= 255 and pixels.std() > 10
    for name in ("input_ids", "attention_mask", "mlm_input_ids", "mlm_labels"):
        assert batch[name].shape == (5, 24) and batch[name].dtype == torch.long
    assert (batch["input_ids"][:, 0] == tokenizer.cls_token_id).all()
    assert torch.equal(batch["attention_mask"], (batch["input_ids"] != tokenizer.pad_token_id).long())
    masked = batch["mlm_labels"] != -100
    assert masked.any() and torch.equal(batch["mlm_labels"][masked], batch["input_ids"][masked])
    assert (batch["mlm_input_ids"][masked] == tokenizer.mask_token_id).any()
    assert batch["image_ids"].tolist() == [image_id_of(k) for k in batch["keys"]]
    decoded = tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True)
    assert decoded == decoded.lower() and "." not in decoded


def test_two_ranks_two_workers_see_every_sample_once_per_epoch(synthetic_shards, tokenizer):
    spec = str(synthetic_shards["train"])
    epochs = []
    for epoch in (0, 1):
        keys_per_rank = []
        for rank in (0, 1):
            rank_loader = loader(spec, tokenizer, rank=rank, world_size=2, num_workers=2)
            rank_loader.set_epoch(epoch)
            batches = list(rank_loader)
            assert len(batches) == len(rank_loader) == 4
            keys_per_rank.append([k for b in batches for k in b["keys"]])
        everything = keys_per_rank[0] + keys_per_rank[1]
        assert sorted(everything) == sorted(train_keys(synthetic_shards["train"]))
        epochs.append(keys_per_rank[0])
    assert epochs[0] != epochs[1]  # reshuffled per epoch


def test_equal_batches_per_rank_with_uneven_shards(synthetic_shards, tokenizer):
    """3 shards of 10 + 1 of 10 over 3 ranks: one rank holds twice the data, all yield the same count."""
    spec = str(synthetic_shards["train"])
    lengths = []
    for rank in range(3):
        rank_loader = loader(spec, tokenizer, rank=rank, world_size=3, num_workers=1, batch_size=4)
        lengths.append(sum(1 for _ in rank_loader))
        assert rank_loader.stats()["skipped"] == {}
    assert lengths == [40 // (3 * 4)] * 3


def test_quota_and_round_robin_arithmetic():
    assert epoch_quotas([[20, 10], [10, 0]], batch_size=5, batches_per_rank=3) == [[2, 1], [3, 0]]
    assert epoch_quotas([[7, 7, 7]], batch_size=2, batches_per_rank=10) == [[4, 3, 3]]
    assert epoch_quotas([[0, 0]], batch_size=2, batches_per_rank=3) == [[2, 1]]
    assert round_robin_position([2, 1, 3], consumed=4) == ([2, 1, 1], 1)  # worker 1 is done: skipped
    assert round_robin_position([2, 1, 3], consumed=0) == ([0, 0, 0], 0)


def batches_equal(a, b) -> bool:
    return a["keys"] == b["keys"] and all(torch.equal(a[k], b[k]) for k in BATCH_KEYS - {"keys"})


def take(train_loader, count: int) -> list[dict]:
    """`count` batches, across epochs as a training loop would run them; stops mid-epoch if need be."""
    batches = []
    while len(batches) < count:
        for batch in train_loader:
            batches.append(batch)
            if len(batches) == count:
                break
    return batches


@pytest.mark.parametrize(
    ("shards", "world_size", "consumed"),
    [
        ("*.tar", 2, 3),
        ("*.tar", 2, 6),
        ("*.tar", 2, 8),
        ("train-00000[0-2].tar", 1, 4),
        ("train-00000[0-2].tar", 1, 13),
    ],
)
def test_resume_gives_the_batches_an_uninterrupted_loader_gives(
    synthetic_shards, tokenizer, shards, world_size, consumed
):
    """Both layouts: even workers, and uneven ones (20 vs 10 samples: quotas 7 and 3, one sample repeated)."""
    options = dict(rank=world_size - 1, world_size=world_size, num_workers=2, batch_size=3, seed=7)
    spec = str(synthetic_shards["train"] / shards)
    reference = loader(spec, tokenizer, **options)
    per_epoch = len(reference)
    uninterrupted = take(reference, 2 * per_epoch + 2)
    interrupted = loader(spec, tokenizer, **options)
    take(interrupted, consumed)
    state = json.loads(json.dumps(interrupted.state_dict()))
    assert (state["epoch"], state["batches_consumed"]) == divmod(consumed, per_epoch)
    resumed = loader(spec, tokenizer, **options)
    resumed.load_state_dict(state)
    assert len(list(resumed)) == per_epoch - consumed % per_epoch  # the rest of the interrupted epoch, no more
    resumed.load_state_dict(state)
    rest = take(resumed, len(uninterrupted) - consumed)
    assert all(batches_equal(a, b) for a, b in zip(uninterrupted[consumed:], rest, strict=True))


@pytest.mark.parametrize(
    ("option", "saved", "now"), [("seed", 0, 1), ("world_size", 1, 2), ("num_workers", 2, 1), ("batch_size", 5, 4)]
)
def test_resume_rejects_a_different_layout(synthetic_shards, tokenizer, option, saved, now):
    spec = str(synthetic_shards["train"])
    state = loader(spec, tokenizer, num_workers=2).state_dict()
    assert state[option] == saved
    with pytest.raises(DataError) as error:
        loader(spec, tokenizer, **{"num_workers": 2, option: now}).load_state_dict(state)
    assert str(error.value) == (
        f"exact resume needs the same {option} as the saved run ({{'{option}': {saved}}}); "
        f"keep them or start the loader fresh"
    )
    resampled = loader(spec, tokenizer, mode="resampled").state_dict()
    with pytest.raises(DataError) as error:
        loader(spec, tokenizer).load_state_dict(resampled)
    assert str(error.value) == "loader state is from mode 'resampled', not 'epoch'; use the same mode"


def wait_until(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def pending_signals(pid: int) -> int:
    """Signals sent to `pid` and not yet delivered or taken, process-wide or by any thread (Linux's /proc), as a
    mask with bit n - 1 for signal n; 0 once the process is gone."""
    mask = 0
    for status in [Path(f"/proc/{pid}/status"), *Path(f"/proc/{pid}/task").glob("*/status")]:
        try:
            lines = status.read_text().splitlines()
        except (FileNotFoundError, ProcessLookupError):  # the process or one of its threads ended meanwhile
            continue
        for line in lines:
            if line.startswith(("ShdPnd:", "SigPnd:")):
                mask |= int(line.split()[1], 16)
    return mask


def test_workers_survive_the_schedulers_signals_but_not_their_rank(synthetic_shards, tokenizer):
    """On preemption SLURM signals every process of the job; the rank checkpoints and needs its workers until
    it exits. The rank itself must still be able to end them (multiprocessing does at interpreter exit)."""
    train = loader(str(synthetic_shards["train"]), tokenizer, num_workers=1)
    before = {child.pid for child in psutil.Process().children()}
    batches = iter(train)
    received = [next(batches)]
    (worker,) = [child for child in psutil.Process().children() if child.pid not in before]
    for number in (signal.SIGTERM, signal.SIGUSR1):  # from another process, as the scheduler sends them
        subprocess.run([sys.executable, "-c", f"import os; os.kill({worker.pid}, {int(number)})"], check=True)
    # kill() returned, so both are pending now; once none is, the worker has taken them (a default action would
    # have ended it by then). The 10 s deadline is only reached on a failure.
    sent = (1 << (signal.SIGTERM - 1)) | (1 << (signal.SIGUSR1 - 1))
    assert wait_until(lambda: not pending_signals(worker.pid) & sent)
    for batch in batches:
        assert worker.status() != psutil.STATUS_ZOMBIE  # still alive while the epoch runs
        received.append(batch)
    assert len(received) == len(train)

    batches = iter(train)
    next(batches)
    (worker,) = [child for child in psutil.Process().children() if child.pid not in before]
    os.kill(worker.pid, signal.SIGTERM)  # from its rank: it ends (not reaped here: torch joins it)
    assert wait_until(lambda: worker.status() == psutil.STATUS_ZOMBIE)
    batches.close()


def good_member_set(key: str, caption: str | None = "a red square") -> dict[str, bytes]:
    members = {f"{key}.jpg": image_bytes()}
    if caption is not None:
        members[f"{key}.json"] = json.dumps({"captions": [caption]}).encode()
    return members


def test_pickle_members_are_never_loaded(tmp_path, tokenizer):
    target = tmp_path / "pwned"
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(CreatesFile(proof))).close()
    assert proof.exists()  # the payload works when unpickled...
    members = {}
    for i in range(6):
        members |= good_member_set(f"s{i}")
        for ext in ("pyd", "pkl", "pth", "pickle"):
            members[f"s{i}.{ext}"] = pickle.dumps(CreatesFile(target))
    write_tar(tmp_path / "evil.tar", members)
    batches = list(loader(str(tmp_path / "evil.tar"), tokenizer, batch_size=3, num_workers=1))
    assert len(batches) == 2
    assert not target.exists()  # ...and the loader never unpickled it


def test_corrupt_samples_are_skipped_counted_and_batches_stay_exact(tmp_path, tokenizer):
    members = {}
    for i in range(8):
        members |= good_member_set(f"g{i}")
    members |= {"trunc.jpg": image_bytes(300, 300)[:300], "trunc.json": json.dumps({"captions": ["x"]}).encode()}
    members |= {"garbage.jpg": b"garbage", "garbage.txt": b"a caption"}
    members |= {"nocap.jpg": image_bytes(), "nocap.txt": b"  ...  "}
    members |= {"noimage.txt": b"a caption"}
    members |= {"big.png": image_bytes(200, 200, fmt="PNG"), "big.txt": b"big"}
    members |= {"latin1.jpg": image_bytes(), "latin1.txt": "café crème".encode("latin-1")}  # never "caf\ufffd"
    members |= {"badjson.jpg": image_bytes(), "badjson.json": b"{oops", "badjson.txt": b"a blue circle"}
    members |= {"onlyjson.jpg": image_bytes(), "onlyjson.json": b"\xff{not json"}  # no txt to fall back on
    write_tar(tmp_path / "mixed.tar", members)
    mixed = loader(str(tmp_path / "mixed.tar"), tokenizer, batch_size=3, num_workers=1, max_pixels=20_000)
    batches = list(mixed)
    assert len(batches) == len(mixed) == 16 // 3
    assert mixed.skip_counts() == {
        "undecodable_image": 1, "truncated_image": 1, "no_caption": 1, "missing_image": 1, "too_many_pixels": 1,
        "bad_text_encoding": 1,
        "bad_json": 1,  # only the sample without a txt; "badjson" trains on its txt caption, uncounted
    }  # fmt: skip
    keys = Counter(k for b in batches for k in b["keys"])
    assert set(keys) == {f"g{i}" for i in range(8)} | {"badjson"} and sum(keys.values()) == 15  # 6 repeated
    assert mixed.stats()["padded"] == 6
    with pytest.raises(DataError) as error:
        list(loader(str(tmp_path / "mixed.tar"), tokenizer, batch_size=3, max_pixels=20_000, max_bad_fraction=0.2))
    assert re.fullmatch(  # 7 of the 16 samples are unusable, counted by reason in reading order
        r"7 of 16 samples skipped \(\{[^}]*\}\) > max_bad_fraction 0\.2; rebuild the shards or raise the bound",
        str(error.value),
    )


def live_children(excluded: set[int]) -> list[psutil.Process]:
    return [
        child
        for child in psutil.Process().children()
        if child.pid not in excluded and child.is_running() and child.status() != psutil.STATUS_ZOMBIE
    ]


def test_a_stream_without_captions_is_an_error_not_a_hang(tmp_path, tokenizer):
    """One line that names the fix, and the workers gone with the error: not left to a garbage collection that
    would stall 5 s per worker wherever it happened to run (the next test, the trainer's exit)."""
    write_tar(tmp_path / "a.tar", {f"k{i}.jpg": image_bytes() for i in range(6)})
    write_tar(tmp_path / "b.tar", {f"j{i}.jpg": image_bytes() for i in range(6)})
    spec = [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    before = {child.pid for child in psutil.Process().children()}
    gc.disable()  # only the error itself may end the workers here
    try:
        with pytest.raises(DataError) as error:
            list(loader(spec, tokenizer, batch_size=2, num_workers=2))
        assert re.fullmatch(
            rf"no valid sample in shards \['{tmp_path}/[ab]\.tar'\] \(skipped: no_caption=6\); check or rebuild them",
            str(error.value),
        )
        assert live_children(before) == []
        with pytest.raises(DataError) as error:
            next(iter(loader(spec, tokenizer, batch_size=2, num_workers=1, mode="resampled")))
        assert str(error.value) == (
            f"1000 samples in a row unusable ({{'no_caption': 1000}}) in {[[spec[0]], [spec[1]]]}; "
            "check or rebuild the shards"
        )
        assert live_children(before) == []
    finally:
        gc.enable()


def test_resampled_mode_is_endless_and_follows_source_weights(tmp_path, tokenizer):
    for name in ("a", "b"):
        for shard in range(2):
            members = {}
            for i in range(10):
                members |= good_member_set(f"{name}{shard}_{i}")
            write_tar(tmp_path / f"{name}{shard}.tar", members)
    spec = f"{tmp_path}/a{{0..1}}.tar::0.8,{tmp_path}/b{{0..1}}.tar::0.2"
    stream = loader(spec, tokenizer, mode="resampled", batch_size=10, num_workers=2, shuffle_buffer=10)
    assert len(stream) == 4  # the nominal epoch
    keys = []
    for index, batch in enumerate(stream):
        keys += batch["keys"]
        if index == 39:  # ten nominal epochs
            break
    share_a = sum(k.startswith("a") for k in keys) / len(keys)
    assert 0.75 < share_a < 0.85


def test_each_epoch_draws_one_caption_per_image_at_random(tmp_path, tokenizer):
    """docs/data.md: one caption at random per epoch. Over 40 epochs each of 2 images shows every one of its 5
    captions (a uniform draw misses one with probability under 0.2%; the draw is seeded, so this is fixed), the
    same seed draws the same captions and another seed other ones."""
    captions = ["a red circle on the left", "a blue square at the top", "a green triangle in the center",
                "a yellow diamond on the right", "a purple circle at the bottom"]  # fmt: skip
    members = {}
    for key in ("first", "second"):
        members |= {f"{key}.jpg": image_bytes(), f"{key}.txt": captions[0].encode()}
        members[f"{key}.json"] = json.dumps({"captions": captions}).encode()
    write_tar(tmp_path / "captions.tar", members)
    caption_of = {
        tuple(tokenizer(caption, padding="max_length", max_length=24)["input_ids"]): caption for caption in captions
    }
    assert len(caption_of) == 5  # the tokenizer tells the five apart

    def drawn(seed: int, epochs: int) -> list[dict[str, str]]:
        train = loader(str(tmp_path / "captions.tar"), tokenizer, batch_size=2, seed=seed, image_size=8)
        per_epoch = []
        for _ in range(epochs):  # each iteration is the next epoch, as in a training loop
            (batch,) = list(train)
            rows = batch["input_ids"].tolist()
            per_epoch.append({key: caption_of[tuple(row)] for key, row in zip(batch["keys"], rows, strict=True)})
        return per_epoch

    epochs = drawn(seed=0, epochs=40)
    assert all(sorted(epoch) == ["first", "second"] for epoch in epochs)  # one caption per image per epoch
    for key in ("first", "second"):
        assert {epoch[key] for epoch in epochs} == set(captions)
    assert drawn(seed=0, epochs=4) == epochs[:4]
    assert drawn(seed=1, epochs=4) != epochs[:4]


def test_jpeg_and_webp_members_are_read_like_jpg_and_png(tmp_path, tokenizer):
    """docs/data.md: jpg/jpeg/png/webp members are read; each sample here is a plain colour in one format."""
    colors = {"jpg": (200, 30, 30), "jpeg": (30, 200, 30), "png": (30, 30, 200), "webp": (200, 200, 30)}
    formats = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
    members = {}
    for extension, color in colors.items():
        options = {"lossless": True} if extension == "webp" else {}
        members[f"{extension}_sample.{extension}"] = encoded(Image.new("RGB", (24, 24), color), formats[extension],
                                                             **options)  # fmt: skip
        members[f"{extension}_sample.txt"] = b"a plain colour"
    write_tar(tmp_path / "formats.tar", members)
    train = loader(str(tmp_path / "formats.tar"), tokenizer, batch_size=4, image_size=8)
    (batch,) = list(train)
    assert train.skip_counts() == {} and sorted(batch["keys"]) == sorted(f"{e}_sample" for e in colors)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(CLIP_STD).view(3, 1, 1) * 255
    for key, pixels in zip(batch["keys"], batch["pixel_values"], strict=True):
        color = torch.tensor(colors[key.removesuffix("_sample")], dtype=torch.float32).view(3, 1, 1)
        assert (pixels * std + mean - color).abs().max() < 4, key  # JPEG may move a plain colour by a level or two
