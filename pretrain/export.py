"""Weights in and out of a ZeRO-3 run: pretrained HF init into partitioned parameters, export at the end."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import load_model, save_model

from pretrain.checkpoint import latest_tag
from pretrain.model import ALBEF, ModelConfig, export_hf, pretrained_state_dict

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model_config.json"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def initialise_partitioned(model: ALBEF) -> None:
    """Run the model's own initialisation on a model built under zero.Init.

    zero.Init partitions each submodule as soon as its __init__ returns, so initialisation done later by a
    parent only touched empty shards (a zero [CLS] token then meets a LayerNorm with eps 1e-12, and the
    first gradients are ~1e4). Gather one module's own parameters at a time, let rank 0 initialise them,
    and GatheredParameters re-partitions rank 0's values to every rank. Only needed (and only called)
    under ZeRO-3: without it the model's own __init__ already initialised everything.
    """
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if own:
            with deepspeed.zero.GatheredParameters(own, modifier_rank=0), torch.no_grad():
                if _rank() == 0:
                    model.init_weights(module)


def load_pretrained_partitioned(model: ALBEF, vit: str | None, bert: str | None) -> None:
    """Copy HF weights into (possibly partitioned) parameters, one parameter gathered at a time."""
    if not (vit or bert):
        return
    params = dict(model.named_parameters())
    for name, value in pretrained_state_dict(model.config, vit=vit, bert=bert).items():
        with deepspeed.zero.GatheredParameters([params[name]], modifier_rank=0), torch.no_grad():
            if _rank() == 0:
                params[name].copy_(value.to(params[name].dtype))


def save_export(model: ALBEF, tokenizer, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out_dir / WEIGHTS_FILE))  # safetensors: no pickle, tied weights handled
    (out_dir / CONFIG_FILE).write_text(json.dumps(asdict(model.config), indent=2))
    export_hf(model, out_dir)
    tokenizer.save_pretrained(str(out_dir / "tokenizer"))


def export_run(ckpt_dir: Path, config: ModelConfig, tokenizer, out_dir: Path) -> ALBEF:
    """Consolidate the newest ZeRO checkpoint to fp32 and write safetensors + HF encoders + tokenizer.

    Written into `<out_dir>.tmp` and renamed at the end: an export directory that exists is complete.
    """
    model = model_from_zero_checkpoint(ckpt_dir, config)
    partial = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(partial, ignore_errors=True)
    save_export(model, tokenizer, partial)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(partial, out_dir)
    return model


def model_from_zero_checkpoint(ckpt_dir: Path, config: ModelConfig) -> ALBEF:
    tag = latest_tag(ckpt_dir)
    if tag is None:
        raise FileNotFoundError(f"no complete checkpoint in {ckpt_dir}: train first or point at a run's checkpoints/")
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    model = ALBEF(config)
    model.load_state_dict(state, strict=True)
    return model


def load_exported(export_dir: Path) -> ALBEF:
    config = ModelConfig(**json.loads((export_dir / CONFIG_FILE).read_text()))
    model = ALBEF(config)
    load_model(model, str(export_dir / WEIGHTS_FILE))
    return model
