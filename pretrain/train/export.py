"""A finished run's weights out of its ZeRO checkpoint: the export directory, and loading it back."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import load_model, save_model

from data_pipeline.text import caption_normalizer
from data_pipeline.transforms import MEAN, STD
from pretrain.model import ALBEF, ModelConfig, export_hf, online_config, online_state_dict
from pretrain.train.checkpoint import latest_tag, rng_state_globals

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model_config.json"


def save_export(model: ALBEF, tokenizer, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out_dir / WEIGHTS_FILE))  # safetensors: no pickle, tied weights handled
    (out_dir / CONFIG_FILE).write_text(json.dumps(asdict(model.config), indent=2))
    export_hf(model, out_dir)
    cleaning = cleaning_tokenizer(tokenizer, model.config.max_position)
    for folder in ("tokenizer", "text_encoder"):  # text_encoder/ as a Hub model folder: weights + tokenizer
        cleaning.save_pretrained(str(out_dir / folder))
    if (out_dir / "image_encoder").is_dir():  # not with a conv patch stem (export_hf)
        (out_dir / "image_encoder" / "preprocessor_config.json").write_text(
            json.dumps(image_processor_config(model.config.image_size), indent=2))


def cleaning_tokenizer(tokenizer, max_length: int):
    """The run's tokenizer with our caption cleaning first in its normalizer, so that a raw caption gives
    the ids training gave its cleaned copy. Saved as a plain fast tokenizer: transformers' BertTokenizer
    rebuilds its normalizer from its arguments when loaded and would drop ours."""
    from tokenizers import Tokenizer, normalizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())  # a copy: the run's tokenizer stays as it is
    own = [backend.normalizer] if backend.normalizer is not None else []
    backend.normalizer = normalizers.Sequence([caption_normalizer(), *own])
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=max_length,
                                   **tokenizer.special_tokens_map)


def image_processor_config(image_size: int) -> dict:
    """Our evaluation transform for `AutoImageProcessor`: the whole image to RGB, resized bicubic (PIL's
    resample 3) to image_size x image_size without keeping the aspect, scaled to [0, 1], CLIP mean and std."""
    return {
        "image_processor_type": "ViTImageProcessor", "do_convert_rgb": True,
        "do_resize": True, "size": {"height": image_size, "width": image_size}, "resample": 3,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": MEAN, "image_std": STD,
    }  # fmt: skip


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
    state = fp32_state_dict(ckpt_dir, tag)
    model = ALBEF(online_config(config))  # the export is the online model: no momentum teacher, no queue
    model.load_state_dict(online_state_dict(state), strict=True)
    return model


def fp32_state_dict(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The whole model's fp32 weights from a checkpoint of any ZeRO stage. DeepSpeed's zero_to_fp32 merges the
    optimizer's partitions of stages 1-3; without ZeRO (stage 0) there are none (zero_to_fp32 fails on the
    missing `param_shapes`), and the one model-states file holds the whole model."""
    if not any((ckpt_dir / tag).glob("*optim_states.pt")):
        with torch.serialization.safe_globals(rng_state_globals()):  # each rank's RNG state, in client_state
            states = torch.load(ckpt_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
        return {name: tensor.float() for name, tensor in states["module"].items()}
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)


def load_exported(export_dir: Path) -> ALBEF:
    config = ModelConfig(**json.loads((export_dir / CONFIG_FILE).read_text()))
    model = ALBEF(config)
    load_model(model, str(export_dir / WEIGHTS_FILE))
    return model
