"""Shared session fixtures: a tiny synthetic COCO set, its shards and a tokenizer trained on them.

Everything is built once per session into a temporary directory (no network, no ./data).
"""

import datetime
from pathlib import Path

import pytest
import torch.distributed as dist

from data_pipeline import load_tokenizer
from data_pipeline.make_shards import main as make_shards_main
from data_pipeline.synthetic import generate
from data_pipeline.synthetic_vqa import generate as generate_vqa
from data_pipeline.train_tokenizer import shard_captions, train_tokenizer

SYNTHETIC_TRAIN_IMAGES = 40
SYNTHETIC_VAL_IMAGES = 12
SHARD_SAMPLES = 10  # 40 train images -> 4 shards: enough for 2 ranks x 2 workers
VQA_TRAIN_IMAGES = 16  # ~5 questions each: 80 questions in 4 shards of 20, for 2 ranks
VQA_VAL_IMAGES = 6


@pytest.fixture(scope="session")
def synthetic_coco(tmp_path_factory) -> Path:
    """A COCO-layout directory: 40 train + 12 val shape scenes of 96x96, five captions each."""
    root = tmp_path_factory.mktemp("synthetic_coco")
    generate(root, train=SYNTHETIC_TRAIN_IMAGES, val=SYNTHETIC_VAL_IMAGES, seed=0, size=96, workers=1)
    return root


@pytest.fixture(scope="session")
def synthetic_shards(synthetic_coco, tmp_path_factory) -> dict[str, Path]:
    """{"train": dir, "val": dir}, each with SHARD_SAMPLES-sample shards and a manifest.json."""
    out = tmp_path_factory.mktemp("shards")
    make_shards_main(
        ["--source", "coco", "--root", str(synthetic_coco), "--name", "synthetic", "--out", str(out),
         "--shard-samples", str(SHARD_SAMPLES), "--min-shards", "1", "--workers", "1", "--quiet"]
    )  # fmt: skip
    return {"train": out / "train", "val": out / "val"}


@pytest.fixture(scope="session")
def synthetic_vqa(tmp_path_factory) -> Path:
    """A VQA v2-layout directory: 16 train + 6 val scenes of 64x64, five question types each."""
    root = tmp_path_factory.mktemp("synthetic_vqa")
    generate_vqa(root, train=VQA_TRAIN_IMAGES, val=VQA_VAL_IMAGES, seed=0, size=64)
    return root


@pytest.fixture(scope="session")
def vqa_shards(synthetic_vqa, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("vqa_shards")
    make_shards_main(["--source", "vqa", "--root", str(synthetic_vqa), "--name", "synthetic_vqa", "--out", str(out),
                      "--shard-samples", "20", "--workers", "1", "--quiet"])
    return {"train": out / "train", "val": out / "val"}


@pytest.fixture(scope="session")
def tokenizer_dir(synthetic_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(shard_captions(str(synthetic_shards["train"])), str(out), vocab_size=500, min_frequency=1)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    return load_tokenizer(str(tokenizer_dir))


@pytest.fixture
def one_rank_group(tmp_path):
    """A real gloo process group of one rank, for code that calls collectives."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=15))
    yield
    dist.destroy_process_group()
