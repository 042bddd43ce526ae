"""A fine-tuning run's result, `<run>/finetuned/`: `weights.safetensors` (the trained weights only: the method's
and the task head's, or, for full fine-tuning, what the task trains) and `finetune.json` (task, answers, PEFT
configuration, model config, and the base's path and weight digest). It loads onto the base export it was
trained from, and nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pretrain.distributed import rank
from pretrain.finetune.base import open_base
from pretrain.finetune.tasks import RetrievalTask, VQATask, adapt, copy_weights, pretrained_part, task_parts
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


def export_merged(finetuned: str | Path, out: str | Path) -> Path:
    """A LoRA result with its updates folded into the base weights, saved as a full fine-tuning result (every
    weight the task runs, `peft.method: none`): one model to serve, no adapter to apply; loads with
    load_finetuned like any other result."""
    finetuned, out = Path(finetuned), Path(out)
    info = json.loads((finetuned / INFO).read_text())
    if info["peft"]["method"] != "lora":
        raise RecipeError(f"{finetuned} was trained with peft {info['peft']['method']}: only LoRA merges into the "
                          "base weights")
    model = load_finetuned(finetuned, merge=True)
    head, used = task_parts(info["task"])
    adapt(model, PeftConfig(method="none"), head, used)  # "trainable" = what a full result holds
    save_finetuned(model, out, {**info, "peft": vars(PeftConfig(method="none")), "merged_from": str(finetuned)})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.finetune.saved",
                                     description="Merge a LoRA fine-tuning result into its base weights.")
    parser.add_argument("--finetuned", required=True, type=Path, help="a LoRA run's finetuned/ directory")
    parser.add_argument("--out", required=True, type=Path, help="where to write the merged result")
    args = parser.parse_args(argv)
    try:
        print(f"merged into {export_merged(args.finetuned, args.out)}")
    except (RecipeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
