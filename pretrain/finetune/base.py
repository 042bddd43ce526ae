"""The pretrained model a fine-tuning run starts from, and its identity (a digest of its weights)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrain.model import ModelConfig
from pretrain.train.export import CONFIG_FILE, WEIGHTS_FILE, load_exported, model_from_zero_checkpoint
from pretrain.train.recipe import RecipeError


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of the weights, in name order: the same weights give the
    same digest whether they come from an export or a checkpoint."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


@dataclass
class Base:
    path: Path
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: str | None  # the export's tokenizer/ directory, if it has one

    @property
    def digest(self) -> str:
        return weights_digest(self.state_dict)


def open_base(path: str | Path) -> Base:
    """An export directory (model.safetensors + model_config.json) or a run's checkpoints/ directory
    (consolidated to fp32; the model config is the run's, beside it). RecipeError names what is missing."""
    path = Path(path)
    if (path / WEIGHTS_FILE).is_file() and (path / CONFIG_FILE).is_file():
        model = load_exported(path)
        tokenizer = path / "tokenizer"
        return Base(path, model.config, model.state_dict(), str(tokenizer) if tokenizer.is_dir() else None)
    if (path / "latest").is_file() and (path.parent / CONFIG_FILE).is_file():
        config = ModelConfig(**json.loads((path.parent / CONFIG_FILE).read_text()))
        return Base(path, config, model_from_zero_checkpoint(path, config).state_dict(), None)
    raise RecipeError(f"base.path {path} is neither an export (with {WEIGHTS_FILE} and {CONFIG_FILE}) nor a run's "
                      "checkpoints/ directory (with 'latest' and the run's model_config.json beside it): point it "
                      "at runs/<name>/export, or run make pretrain first")
