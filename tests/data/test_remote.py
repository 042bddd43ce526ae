"""Shards read from where clusters keep them: a real HTTP server in the test (with dropped connections, 5xx and
404 on demand), `pipe:` commands, an fsspec filesystem, and manifests written for foreign shards."""

import functools
import http.server
import json
import shutil
import threading
from collections import Counter
from pathlib import Path

import fsspec
import pytest
import torch

from data_pipeline import DataError, check_shards, make_train_loader, shard_io
from data_pipeline.index_shards import main as index_shards
from data_pipeline.manifest import MANIFEST, file_sha256
from data_pipeline.vqa import answer_vocabulary
from tests.helpers.data import image_bytes, read_split, write_tar


class FaultyHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a directory with Range support; `server.faults[name]` lists what the next requests get instead:
    "cut" (the headers and half the bytes, then the connection closes) or an HTTP status such as "503"."""

    def do_GET(self) -> None:
        name = self.path.lstrip("/")
        self.server.requests.append((name, self.headers.get("Range")))
        plan = self.server.faults.get(name)
        action = plan.pop(0) if plan else None
        path = Path(self.directory) / name
        if action is not None and action.isdigit():
            self.send_error(int(action))
            return
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-")) if self.server.ranges and \
            self.headers.get("Range") else 0  # fmt: skip
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        self.wfile.write(body[: len(body) // 2] if action == "cut" else body)  # HTTP/1.0: the connection closes

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(tmp_path):
    """An HTTP server on a free port serving tmp_path/www; `.url`, `.root`, `.faults`, `.requests`, `.ranges`."""
    root = tmp_path / "www"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(FaultyHandler, directory=str(root)))
    httpd.faults, httpd.requests, httpd.ranges, httpd.root = {}, [], True, root
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def served_train(server, synthetic_shards):
    """The synthetic train split (4 shards of 10, with its manifest) served at server.url/train."""
    shutil.copytree(synthetic_shards["train"], server.root / "train")
    return f"{server.url}/train"


@pytest.fixture
def quick_retries(monkeypatch):
    monkeypatch.setattr(shard_io, "FIRST_DELAY_S", 0.001)


def loader(spec, tokenizer, **overrides):
    options = dict(batch_size=5, rank=0, world_size=1, num_workers=0, seed=0, image_size=32, max_len=24)
    return make_train_loader(spec, tokenizer, **{**options, **overrides})


def epoch(spec, tokenizer, **overrides) -> tuple[list[dict], dict]:
    train = loader(spec, tokenizer, **overrides)
    return list(train), train.stats()


def assert_same_batches(ours: list[dict], reference: list[dict]) -> None:
    assert len(ours) == len(reference) > 0
    for a, b in zip(ours, reference):
        assert a["keys"] == b["keys"] and torch.equal(a["pixel_values"], b["pixel_values"])
        assert torch.equal(a["mlm_input_ids"], b["mlm_input_ids"])


def test_an_http_directory_reads_its_manifest_and_gives_the_local_batches(served_train, synthetic_shards, tokenizer):
    assert [s.path for s in check_shards(served_train, world_size=2, num_workers=2).shards][:1] == [
        f"{served_train}/train-000000.tar"]  # fmt: skip
    for workers in (0, 2):  # 2: forked workers read over HTTP
        remote, stats = epoch(served_train, tokenizer, num_workers=workers)
        local, _ = epoch(str(synthetic_shards["train"]), tokenizer, num_workers=workers)
        assert_same_batches(remote, local)
        assert stats == {"seen": 40, "padded": 0, "skipped": {}, "read_retries": 0}
    every_pair = {"pairs": "every_caption", "batch_size": 8}  # the epoch counted from the caption members
    assert len(loader(served_train, tokenizer, **every_pair)) == len(loader(str(synthetic_shards["train"]),
                                                                           tokenizer, **every_pair)) == 25


@pytest.mark.parametrize("ranges", [True, False])  # False: a server that ignores Range (the reader skips ahead)
def test_a_cut_connection_and_5xx_are_retried_where_the_read_stopped(
    server, served_train, synthetic_shards, tokenizer, quick_retries, ranges
):
    server.ranges = ranges
    server.faults = {"train/train-000000.tar": ["cut"], "train/train-000002.tar": ["503", "cut", "502"]}
    remote, stats = epoch(served_train, tokenizer)
    assert_same_batches(remote, epoch(str(synthetic_shards["train"]), tokenizer)[0])  # no byte lost or doubled
    assert stats == {"seen": 40, "padded": 0, "skipped": {}, "read_retries": 4}
    asked = [byte_range for name, byte_range in server.requests if name == "train/train-000000.tar"]
    assert asked[0] is None and asked[1].startswith("bytes=") and int(asked[1][6:-1]) > 0  # continued, not restarted


def test_a_404_shard_is_skipped_counted_not_retried_and_bounded(server, served_train, tokenizer):
    (server.root / "train" / "train-000001.tar").unlink()
    batches, stats = epoch(served_train, tokenizer)
    assert len(batches) == 8 and stats["skipped"] == {"unreadable_shard": 1} and stats["read_retries"] == 0
    assert stats["seen"] == 30 and stats["padded"] == 10  # the epoch is filled as for any short worker
    assert [name for name, _ in server.requests].count("train/train-000001.tar") == 1
    with pytest.raises(DataError, match=r"1 of 30 samples skipped \(\{'unreadable_shard': 1\}\) > max_bad_fraction"):
        epoch(served_train, tokenizer, max_bad_fraction=0.01)


def test_a_shard_that_keeps_failing_is_skipped_after_its_attempts(server, served_train, tokenizer, quick_retries):
    server.faults = {"train/train-000003.tar": ["500"] * shard_io.ATTEMPTS}
    batches, stats = epoch(served_train, tokenizer)
    assert len(batches) == 8 and stats["skipped"] == {"unreadable_shard": 1}
    assert stats["read_retries"] == shard_io.ATTEMPTS - 1 and stats["seen"] == 30


def test_url_patterns_weighted_lists_and_pipe_commands(server, served_train, synthetic_shards, tokenizer):
    train = synthetic_shards["train"]
    pattern = f"{served_train}/train-{{000000..000001}}.tar"
    assert [s.num_samples for s in check_shards(pattern, world_size=1, num_workers=2).shards] == [10, 10]
    piped = f"pipe:cat {train}/train-{{000002..000003}}.tar"
    spec = f"{pattern}::0.5,{piped}::0.5"
    mixed = loader(spec, tokenizer, mode="resampled", seed=1)
    keys = [key for batch, _ in zip(mixed, range(8)) for key in batch["keys"]]
    by_shard = {s["__key__"].rsplit("/", 1)[-1]: n // 10 for n, s in enumerate(read_split(train))}
    assert set(Counter(by_shard[key] for key in keys)) == {0, 1, 2, 3}  # both sources, all four shards
    assert mixed.stats()["skipped"] == {}
    with pytest.raises(TypeError, match="no nominal epoch length"):  # pipe shards are not counted
        len(mixed)


def test_epoch_mode_without_counts_says_how_to_get_them(server, synthetic_shards):
    foreign = server.root / "foreign"
    foreign.mkdir()
    shutil.copy(synthetic_shards["train"] / "train-000000.tar", foreign / "a.tar")
    url = f"{server.url}/foreign/a.tar"
    with pytest.raises(DataError) as error:
        check_shards(url, world_size=1, num_workers=1)
    assert str(error.value) == (
        f"epoch mode needs each shard's sample count from a {MANIFEST} beside the shards, and '{url}' has none "
        f"listing them all; write one with `python -m data_pipeline.index_shards {url}` (it reads the shards, "
        "rewrites nothing) or use mode='resampled'"
    )
    with pytest.raises(DataError, match=r"`pipe:` shards have no manifest.json to give it .* or use mode='resampled'"):
        check_shards(f"pipe:cat {foreign}/a.tar", world_size=1, num_workers=1)
    with pytest.raises(DataError, match=r"foreign has no manifest.json; write one with `python -m data_pipeline"):
        check_shards(f"{server.url}/foreign", world_size=1, num_workers=1, mode="resampled")


def test_an_fsspec_url_reads_like_a_local_directory(synthetic_shards, tokenizer):
    """memory:// stands in for s3:// and gs://: the same fsspec calls, without a cloud."""
    memory = fsspec.filesystem("memory")
    for path in synthetic_shards["train"].iterdir():
        memory.pipe(f"/h14/train/{path.name}", path.read_bytes())
    try:
        local = epoch(str(synthetic_shards["train"]), tokenizer)[0]
        assert_same_batches(epoch("memory://h14/train", tokenizer)[0], local)
        assert len(check_shards("memory://h14/train/*.tar", world_size=1, num_workers=4).shards) == 4
    finally:
        memory.rm("/h14", recursive=True)


def write_img2dataset_shards(directory: Path, sizes: list[int]) -> list[str]:
    """Shards as img2dataset writes them: KEY.jpg, KEY.txt, KEY.json (its own fields), plus a stats file."""
    directory.mkdir()
    keys, key = [], 0
    for shard, size in enumerate(sizes):
        members = {}
        for _ in range(size):
            name = f"{shard:05d}{key:04d}"
            meta = {"url": f"http://example.com/{key}.jpg", "caption": f"a red square number {key}", "key": name,
                    "status": "success", "error_message": None, "width": 40, "height": 30}  # fmt: skip
            members |= {f"{name}.jpg": image_bytes(), f"{name}.txt": meta["caption"].encode(),
                        f"{name}.json": json.dumps(meta).encode()}  # fmt: skip
            keys.append(name)
            key += 1
        write_tar(directory / f"{shard:05d}.tar", members)
        (directory / f"{shard:05d}_stats.json").write_text(json.dumps({"successes": size}))
    return keys


def test_foreign_shards_are_indexed_without_being_rewritten(server, tokenizer, quick_retries, tmp_path, capsys):
    keys = write_img2dataset_shards(server.root / "laion", [8, 8, 4])  # each worker: a multiple of the batch
    tars = sorted((server.root / "laion").glob("*.tar"))
    digests = {tar.name: file_sha256(tar) for tar in tars}
    server.faults = {"laion/00001.tar": ["cut"]}  # the digest must still cover every byte once
    out = tmp_path / "indexed.json"
    assert index_shards([f"{server.url}/laion/{{00000..00002}}.tar", "--out", str(out), "--workers", "2"]) == 0
    manifest = json.loads(out.read_text())
    assert [(e["name"], e["num_samples"], e["bytes"], e["sha256"]) for e in manifest["shards"]] == [
        (tar.name, n, tar.stat().st_size, digests[tar.name]) for tar, n in zip(tars, [8, 8, 4])]  # fmt: skip
    assert manifest["num_samples"] == 20 and manifest["read_retries"] == 1
    assert index_shards([str(server.root / "laion")]) == 0  # local directory: written beside the shards
    assert json.loads((server.root / "laion" / MANIFEST).read_text())["shards"] == manifest["shards"]
    assert {tar.name: file_sha256(tar) for tar in tars} == digests
    batches, stats = epoch(f"{server.url}/laion", tokenizer, batch_size=4, num_workers=2)
    assert sorted(key for batch in batches for key in batch["keys"]) == keys
    assert stats == {"seen": 20, "padded": 0, "skipped": {}, "read_retries": 0}
    assert index_shards([f"{server.url}/laion"]) == 2
    assert "cannot be listed; name its shards with a brace pattern" in capsys.readouterr().err


def test_the_vqa_answer_vocabulary_reads_served_shards_as_local_ones(server, vqa_shards):
    shutil.copytree(vqa_shards["train"], server.root / "vqa")
    served, local = answer_vocabulary(f"{server.url}/vqa", 5), answer_vocabulary(str(vqa_shards["train"]), 5)
    assert served == local and local.total > 0 and len(local.answers) == 5
