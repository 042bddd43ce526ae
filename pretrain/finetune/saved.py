"""A fine-tuning run's result, `<run>/finetuned/`: `weights.safetensors` (the trained weights only: the method's
and the task head's, or, for full fine-tuning, what the task trains) and `finetune.json` (task, answers, PEFT
configuration, model config, and the base's path and weight digest). It loads onto the base export it was
trained from, and nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pretrain.distributed import rank
from pretrain.model import ModelConfig
from pretrain.model.peft import PeftConfig, merge_lora
from pretrain.train.recipe import RecipeError

WEIGHTS = "weights.safetensors"
INFO = "finetune.json"


def save_finetuned(model: nn.Module, out_dir: Path, info: dict) -> None:
    """Every rank calls this (the trained weights are gathered from their ZeRO-3 partitions); rank 0 writes
    `out_dir`, complete or not at all (written beside it, then renamed)."""
    import deepspeed

    trained = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    with deepspeed.zero.GatheredParameters([param for _, param in trained]):
        state = {name: param.detach().float().cpu().clone() for name, param in trained} if rank() == 0 else {}
    if rank() != 0:
        return
    partial = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file(state, str(partial / WEIGHTS))
    (partial / INFO).write_text(json.dumps(info, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(partial, out_dir)


def load_finetuned(finetuned: str | Path, base_path: str | Path | None = None, merge: bool = False) -> nn.Module:
    """The fine-tuned model on one process: the base (the recorded one, or `base_path`), the method applied, the
    trained weights loaded; `merge` folds LoRA updates into the base weights (for export)."""
    from pretrain.finetune.base import open_base
    from pretrain.finetune.tasks import RetrievalTask, VQATask

    finetuned = Path(finetuned)
    info = json.loads((finetuned / INFO).read_text())
    base = open_base(base_path or info["base"]["path"])
    if base.digest != info["base"]["digest"]:
        raise RecipeError(f"{finetuned} was trained on a base with weight digest {info['base']['digest'][:12]}, but "
                          f"{base.path} has {base.digest[:12]}: load it onto the base it was trained from "
                          f"({info['base']['path']})")
    peft = PeftConfig(**info["peft"])
    config = ModelConfig(**info["model_config"])
    task = (VQATask(base.state_dict, base.digest, peft, tuple(info["answers"])) if info["task"] == "vqa"
            else RetrievalTask(base.state_dict, base.digest, peft))
    model = task.make_model(config)
    from pretrain.finetune.tasks import adapt, copy_weights, pretrained_part

    copy_weights(pretrained_part(model, task.pretrained_prefix), base.state_dict)
    adapt(model, peft, task.task_head, task.used)
    trained = load_file(str(finetuned / WEIGHTS))
    expected = {name for name, param in model.named_parameters() if param.requires_grad}
    if set(trained) != expected:
        raise RecipeError(f"{finetuned / WEIGHTS} does not hold this method's weights "
                          f"({len(set(trained) ^ expected)} names differ): it is damaged or from another version")
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in trained.items():
            params[name].copy_(value)
    if merge and peft.method == "lora":
        merge_lora(model)
    return model.eval()
