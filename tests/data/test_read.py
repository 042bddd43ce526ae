"""Reading raw samples from tars: grouping by key, member selection, damaged and missing shards."""

from collections import Counter

from data_pipeline.samples import read_samples
from tests.helpers.data import tar_bytes


def test_members_are_grouped_by_key_and_only_wanted_ones_are_read(tmp_path):
    shard = tmp_path / "a.tar"
    shard.write_bytes(
        tar_bytes([
            ("one.JPG", b"i1"), ("one.json", b"{}"), ("one.pkl", b"never read"), ("one.txt", b"t1"),
            ("one.txt", b"second copy"),
            ("dir/two.jpg", b"i2"), ("dir/two.pth", b"never read either"), (".jpg", b"no key"),
            ("three.txt", b"t3"),
        ])
    )  # fmt: skip
    skipped = Counter()
    samples = list(read_samples([str(shard)], skipped))
    assert samples == [
        {"__key__": "one", "jpg": b"i1", "json": b"{}", "txt": b"t1"},
        {"__key__": "dir/two", "jpg": b"i2"},
        {"__key__": "three", "txt": b"t3"},
    ]
    assert skipped == {"duplicate_member": 1}


def test_damaged_and_missing_shards_are_counted_and_earlier_samples_kept(tmp_path):
    members = [(f"k{i}.{ext}", bytes(2000)) for i in range(3) for ext in ("jpg", "txt")]
    damaged = tmp_path / "damaged.tar"
    member_bytes = 512 + 2048  # header + data padded to 512-byte blocks
    damaged.write_bytes(tar_bytes(members)[: 4 * member_bytes + 512 + 100])  # cut inside k2.jpg
    good = tmp_path / "good.tar"
    good.write_bytes(tar_bytes([("g.jpg", b"g"), ("g.txt", b"t")]))
    skipped = Counter()
    samples = list(read_samples([str(tmp_path / "missing.tar"), str(damaged), str(good)], skipped))
    complete = [s["__key__"] for s in samples if {"jpg", "txt"} <= s.keys()]
    assert complete == ["k0", "k1", "g"]
    assert skipped["unreadable_shard"] == 2
