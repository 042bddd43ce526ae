"""What a training run trains: the model, its data, its evaluation and its export. The loop, engine,
checkpoints and fault handling are one for every task; a task supplies only these pieces.

`PretrainTask` is ALBEF pretraining (ITC + ITM + MLM, retrieval evaluation, full export); fine-tuning tasks
live in `pretrain.finetune`. A model's forward returns a NamedTuple of scalar tensors: `loss` is
optimised, `loss_*` are logged as loss/*, every other field as train/* (see metrics.step_scalars).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from data_pipeline import load_eval_data, make_train_loader
from pretrain.eval.picture import retrieval_picture
from pretrain.eval.retrieval import evaluate_retrieval, format_table, non_finite_warning, save_eval_json
from pretrain.model import ALBEF, load_pretrained
from pretrain.train.export import export_run
from pretrain.train.flops import train_flops_per_sample
from pretrain.train.metrics import TrainLog


class PretrainTask:
    """ALBEF pretraining from scratch or from Hugging Face ViT/BERT weights."""

    # frozen parameters (a momentum teacher) are part of the run's state: checkpoints keep them
    frozen_is_base = False

    def build_model(self, setup) -> nn.Module:
        """Called inside zero.Init: the model's parameters are partitioned as they are made."""
        return ALBEF(setup.model_config)

    def load_weights(self, model: nn.Module, setup) -> None:
        """After the model's own initialisation: weights it starts from."""
        load_pretrained(model, vit=setup.recipe.model.vit, bert=setup.recipe.model.bert)
        model.start_momentum_teacher()  # from the final weights (a no-op without momentum distillation)

    def build_data(self, setup, rank: int, world: int):
        return build_caption_data(setup, rank, world, swap_groups=setup.recipe.data.swap_negatives)

    def flops_per_sample(self, setup) -> Callable[[float], float]:
        return partial(train_flops_per_sample, setup.model_config, mlm_probability=setup.recipe.data.mlm_probability,
                       swap_negatives=bool(setup.recipe.data.swap_negatives))

    def evaluate(self, engine, eval_data, setup, step: int, log: TrainLog, dtype: torch.dtype) -> dict:
        return run_retrieval_evaluation(engine, eval_data, setup, step, log, dtype)

    def export(self, engine, setup) -> Path:
        """Every rank calls this after the final checkpoint; rank 0 writes <run>/export. Returns where."""
        run_path = setup.recipe.run_path
        if dist.get_rank() == 0:
            export_run(run_path / "checkpoints", setup.model_config, setup.tokenizer, run_path / "export")
        return run_path / "export"


def build_caption_data(setup, rank: int, world: int, swap_groups: list[list[str]] | None = None):
    """The caption loader of the batch contract (with word-swapped hard negatives for `swap_groups`) and, with
    data.val, the retrieval evaluation set."""
    recipe, image_size = setup.recipe, setup.model_config.image_size
    loader = make_train_loader(
        recipe.data.train, setup.tokenizer, batch_size=recipe.schedule.micro_batch_size, rank=rank,
        world_size=world, num_workers=recipe.data.num_workers, seed=recipe.seed, image_size=image_size,
        max_len=recipe.data.max_len, mode=recipe.data.mode, mlm_probability=recipe.data.mlm_probability,
        crop_scale=recipe.data.crop_scale, hflip=recipe.data.hflip, randaugment=recipe.data.randaugment,
        pairs=recipe.data.pairs, max_bad_fraction=recipe.data.max_bad_fraction, min_side=recipe.data.min_side,
        swap_groups=swap_groups)
    eval_data = None
    if recipe.data.val:
        eval_data = load_eval_data(recipe.data.val, setup.tokenizer, image_size=image_size,
                                   max_len=recipe.data.max_len)
    return loader, eval_data


def run_retrieval_evaluation(engine, eval_data, setup, step: int, log: TrainLog, dtype: torch.dtype) -> dict:
    recipe = setup.recipe
    metrics, examples = evaluate_retrieval(engine.module, eval_data, recipe.eval.batch_size,
                                           recipe.eval.itm_rerank_k, engine.device, dtype)
    if dist.get_rank() == 0:
        save_eval_json(recipe.run_path / "eval.json", metrics)
        log.retrieval(step, metrics, retrieval_picture(examples, eval_data))
        tqdm.write(f"[step {step}] " + format_table(metrics))
        warning = non_finite_warning(metrics)
        if warning:
            tqdm.write(f"[step {step}] {warning}")
    return metrics
