"""Fine-tuning fixtures: a base export (a seeded, untrained tiny ALBEF with the session tokenizer: what
fine-tuning needs of a base is its files). The synthetic VQA set and its shards are session fixtures
(tests/conftest.py)."""

from pathlib import Path

import pytest
import torch

from pretrain.model import ALBEF, model_preset
from pretrain.train.export import save_export


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
