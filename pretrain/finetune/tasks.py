"""The fine-tuning tasks, as the training loop sees them (pretrain.train.task): each builds its model, loads
the base into it, applies the PEFT method, and brings its own data, evaluation and metric.

retrieval: ALBEF's fine-tuning recipe, ITC + ITM on the train split (the MLM head runs with weight 0 and stays
  frozen), evaluated by the pretraining app's retrieval evaluation (R@1/5/10 both ways).
vqa: ALBEFForVQA, BCE over the answer vocabulary against VQA soft scores; VQA accuracy overall and per
  question type. Batches add `answer_scores` (data_pipeline.vqa).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from data_pipeline import make_train_loader
from data_pipeline.vqa import VQATargets, load_vqa_eval
from pretrain.distributed import rank
from pretrain.eval.retrieval import save_eval_json
from pretrain.eval.vqa import evaluate_vqa, format_vqa
from pretrain.model import ALBEF, ModelConfig
from pretrain.model.peft import PeftConfig, apply_peft
from pretrain.model.vqa import ALBEFForVQA
from pretrain.train.flops import forward_flops_by_component
from pretrain.train.metrics import TrainLog
from pretrain.train.task import PretrainTask, build_caption_data, run_retrieval_evaluation

BASE_FILE = "base.json"  # in the run directory: the base the run was started from (checked on resume)


def copy_weights(module: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Every parameter of `module` from `state_dict`, into plain or ZeRO-3-partitioned parameters (one gathered
    at a time, rank 0 writes, the gather re-partitions)."""
    import deepspeed

    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0), torch.no_grad():
            if rank() == 0:
                param.copy_(state_dict[name].to(param.dtype))


def adapt(model: nn.Module, peft: PeftConfig, task_head: tuple[str, ...], used: tuple[str, ...]) -> None:
    """Full fine-tuning trains what the task runs (`used`) and its head; a PEFT method its own weights and the head."""
    if peft.method == "none":
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith(used + task_head))
    else:
        apply_peft(model, peft, trained=task_head)


class FinetuneTask:
    """What every fine-tuning task shares: the base in, the method applied, the trained weights out."""

    name = ""
    frozen_is_base = True  # checkpoints leave the frozen base out: it is loaded from base.path (checked by digest)
    task_head: tuple[str, ...] = ()
    used: tuple[str, ...] = ()
    pretrained_prefix = ""  # where the ALBEF sits inside the task model

    def __init__(self, base_state: dict, base_digest: str, peft: PeftConfig):
        self.base_state, self.base_digest, self.peft = base_state, base_digest, peft

    def make_model(self, config: ModelConfig) -> nn.Module:
        raise NotImplementedError

    def info(self) -> dict:
        """What a saved fine-tuning result needs besides its weights to be rebuilt (finetune.json)."""
        return {"task": self.name, "peft": vars(self.peft)}

    def build_model(self, setup) -> nn.Module:
        return self.make_model(setup.model_config)

    @staticmethod
    def task_config(config: ModelConfig) -> ModelConfig:
        """The base's config without momentum distillation (fine-tuning runs the online model alone) or the
        caption-word objective (a pretraining signal: the task's own loss is what fine-tuning optimises)."""
        return replace(config, momentum_distillation=False, queue_size=0, weight_words=0.0)

    def load_weights(self, model: nn.Module, setup) -> None:
        copy_weights(pretrained_part(model, self.pretrained_prefix), self.base_state)
        self.base_state = {}  # loaded: no need to hold a second copy for the whole run
        torch.manual_seed(setup.recipe.seed)  # the method's new weights drawn alike on every rank
        adapt(model, self.peft, self.task_head, self.used)
        if rank() == 0:
            (setup.recipe.run_path / BASE_FILE).write_text(
                json.dumps({"path": str(setup.recipe.base.path), "digest": self.base_digest}, indent=2))
            trained, total = parameter_counts(model)
            print(f"[vlpretrain] fine-tuning {self.name} with peft {self.peft.method}: {trained} of {total} "
                  f"parameters trainable ({100 * trained / total:.2f}%)", flush=True)

    def export(self, engine, setup) -> Path:
        """<run>/finetuned: the trained weights and what rebuilds the model around them (pretrain.finetune.saved)."""
        from pretrain.finetune.saved import save_finetuned

        out = setup.recipe.run_path / "finetuned"
        save_finetuned(engine.module, out, {**self.info(), "model_config": vars(setup.model_config),
                                            "base": {"path": str(setup.recipe.base.path), "digest": self.base_digest}})
        return out


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter elements, whole sizes also under ZeRO-3."""
    numel = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
    return sum(n for n, trained in numel if trained), sum(n for n, _ in numel)


def task_parts(task: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(task head, used parts) of a task by name."""
    cls = {"vqa": VQATask, "retrieval": RetrievalTask}[task]
    return cls.task_head, cls.used


def pretrained_part(model: nn.Module, prefix: str) -> nn.Module:
    return model.get_submodule(prefix.rstrip(".")) if prefix else model


class RetrievalTask(FinetuneTask):
    name = "retrieval"
    task_head = ("vision_proj.", "text_proj.", "itm_head.", "temp")
    used = ("image_encoder.", "text_encoder.", "fusion_encoder.")

    def make_model(self, config: ModelConfig) -> nn.Module:
        return ALBEF(replace(self.task_config(config), weight_mlm=0.0))

    def build_data(self, setup, rank: int, world: int):
        return build_caption_data(setup, rank, world)

    def flops_per_sample(self, setup) -> Callable[[float], float]:
        return PretrainTask().flops_per_sample(setup)

    def evaluate(self, engine, eval_data, setup, step: int, log: TrainLog, dtype: torch.dtype) -> dict:
        return run_retrieval_evaluation(engine, eval_data, setup, step, log, dtype)


class VQATask(FinetuneTask):
    name = "vqa"
    task_head = ALBEFForVQA.TASK_HEAD
    used = ALBEFForVQA.USED
    pretrained_prefix = "albef."

    def __init__(self, base_state: dict, base_digest: str, peft: PeftConfig, answers: tuple[str, ...]):
        super().__init__(base_state, base_digest, peft)
        self.answers = answers

    def make_model(self, config: ModelConfig) -> nn.Module:
        return ALBEFForVQA(self.task_config(config), len(self.answers))

    def info(self) -> dict:
        return {**super().info(), "answers": list(self.answers)}

    def build_data(self, setup, rank: int, world: int):
        recipe, image_size = setup.recipe, setup.model_config.image_size
        targets = VQATargets(self.answers)
        loader = make_train_loader(
            recipe.data.train, setup.tokenizer, batch_size=recipe.schedule.micro_batch_size, rank=rank,
            world_size=world, num_workers=recipe.data.num_workers, seed=recipe.seed, image_size=image_size,
            max_len=recipe.data.max_len, mode=recipe.data.mode, mlm_probability=recipe.data.mlm_probability,
            crop_scale=recipe.data.crop_scale, hflip=recipe.data.hflip, randaugment=recipe.data.randaugment,
            pairs=recipe.data.pairs, max_bad_fraction=recipe.data.max_bad_fraction, min_side=recipe.data.min_side,
            sample_targets=targets)
        eval_data = None
        if recipe.data.val:
            eval_data = load_vqa_eval(recipe.data.val, setup.tokenizer, targets, image_size=image_size,
                                      max_len=recipe.data.max_len)
        return loader, eval_data

    def flops_per_sample(self, setup) -> Callable[[float], float]:
        return lambda text_tokens: 3 * vqa_forward_flops(setup.model_config, text_tokens)

    def evaluate(self, engine, eval_data, setup, step: int, log: TrainLog, dtype: torch.dtype) -> dict:
        metrics = evaluate_vqa(engine.module, eval_data, setup.recipe.eval.batch_size, engine.device, dtype)
        if dist.get_rank() == 0:
            save_eval_json(setup.recipe.run_path / "eval.json", metrics)
            log.scalars(step, {"eval/vqa_accuracy": metrics["overall"],
                               **{f"eval/vqa_{kind}": acc for kind, acc in metrics["per_type"].items()}})
            tqdm.write(f"[step {step}] {format_vqa(metrics)}")
        return metrics


def vqa_forward_flops(config: ModelConfig, text_tokens: float) -> float:
    """Forward FLOPs of one question: the ViT, the text encoder once, one fusion stream with its image's keys and
    values, from the pretraining count's components (which run the text twice and four fusion streams)."""
    parts = forward_flops_by_component(config, text_tokens, mlm_probability=0.0)
    streams = 4
    return (parts["vision.patch_embed"] + parts["vision.projections"] + parts["vision.self_attention"]
            + (parts["text.projections"] + parts["text.self_attention"]) / 2
            + (parts["fusion.projections"] + parts["fusion.self_attention"] + parts["fusion.cross_attention"]) / streams
            + parts["fusion.cross_key_value"] / 2)
