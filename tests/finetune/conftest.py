"""Fine-tuning fixtures: a small synthetic VQA set in the VQA v2 layout and its shards, and a base export (a
seeded, untrained tiny ALBEF with the session tokenizer: what fine-tuning needs of a base is its files)."""

from pathlib import Path

import pytest
import torch

from data_pipeline.make_shards import main as make_shards_main
from data_pipeline.synthetic_vqa import generate
from pretrain.model import ALBEF, model_preset
from pretrain.train.export import save_export

VQA_TRAIN_IMAGES = 16  # ~5 questions each: 80 questions in 4 shards of 20, for 2 ranks
VQA_VAL_IMAGES = 6


@pytest.fixture(scope="session")
def synthetic_vqa(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic_vqa")
    generate(root, train=VQA_TRAIN_IMAGES, val=VQA_VAL_IMAGES, seed=0, size=64)
    return root


@pytest.fixture(scope="session")
def vqa_shards(synthetic_vqa, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("vqa_shards")
    make_shards_main(["--source", "vqa", "--root", str(synthetic_vqa), "--name", "synthetic_vqa", "--out", str(out),
                      "--shard-samples", "20", "--workers", "1", "--quiet"])
    return {"train": out / "train", "val": out / "val"}


def make_base(tokenizer, out: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    save_export(ALBEF(model_preset("tiny", vocab_size=len(tokenizer))), tokenizer, out)
    return out


@pytest.fixture(scope="session")
def base_export(tokenizer, tmp_path_factory) -> Path:
    return make_base(tokenizer, tmp_path_factory.mktemp("base") / "export", seed=0)


@pytest.fixture(scope="session")
def other_base_export(tokenizer, tmp_path_factory) -> Path:
    return make_base(tokenizer, tmp_path_factory.mktemp("other_base") / "export", seed=1)
