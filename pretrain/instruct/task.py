"""Instruction tuning as the training loop sees it (pretrain.train.task): the multimodal LM built partitioned,
its weights copied in from the base, instruction batches from the shared loader, captioning evaluation and
the export (a saved MultimodalLM that `python -m pretrain.generate` and stage 2 load).

Batches are the caption loader's with `input_ids`, `attention_mask` and `labels` replaced by the rendered
conversation (data_pipeline.instructions.tokenize_conversation, per sample in the loader's workers).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from data_pipeline import make_train_loader
from data_pipeline.collate import tokenize
from data_pipeline.instructions import first_instruction, has_assistant_turn, tokenize_conversation
from pretrain.distributed import rank
from pretrain.eval.picture import answers_picture
from pretrain.eval.retrieval import save_eval_json
from pretrain.model.multimodal_lm import MultimodalLM, MultimodalLMOutput, QueryResampler
from pretrain.train.flops import encoder_forward_flops
from pretrain.train.metrics import TrainLog


class InstructModel(nn.Module):
    """The engine's module: the multimodal LM called with the loader's batch dict."""

    def __init__(self, model: MultimodalLM, per_conversation: bool = False):
        super().__init__()
        self.model = model
        self.per_conversation = per_conversation
        # LoRA's B starts at zero (the adapted LM starts as the LM); every other new weight as its module resets it
        self._zero_init = {id(m) for n, m in model.named_modules() if n.endswith("lora_B.default")}

    def forward(self, batch: dict) -> MultimodalLMOutput:
        question = (batch["question_ids"], batch["question_mask"]) if "question_ids" in batch else None
        return self.model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["labels"],
                          self.per_conversation, question)

    @torch.no_grad()
    def init_weights(self, module: nn.Module) -> None:
        if id(module) in self._zero_init:
            module.weight.zero_()
        elif isinstance(module, QueryResampler):
            module.queries.normal_(std=0.02)
        elif hasattr(module, "reset_parameters"):
            module.reset_parameters()


class InstructTask:
    frozen_is_base = True  # checkpoints leave the frozen encoder / LM out: load_weights brings them from base.path

    def __init__(self, parts: tuple, loader_tokenizer):
        self.parts = parts
        self.encoder_config, self.projector_config, self.lm_config, self.lm_tokenizer, self.question_tokenizer = parts
        self.loader_tokenizer = loader_tokenizer

    def set_stage(self, model: MultimodalLM, setup) -> None:
        stage = setup.recipe.stage
        model.set_training_stage(stage.name, stage.lm_training, stage.train_encoder, stage.lora_rank, stage.lora_alpha,
                                 stage.encoder_lr_scale)

    def reference(self, setup) -> MultimodalLM:
        """The whole model on this process's CPU with the base's weights, in the stage's form."""
        recipe = setup.recipe
        torch.manual_seed(recipe.seed)  # a new projector is drawn alike wherever it is built
        model = MultimodalLM.load(recipe.base.path, recipe.lm.name, recipe.lm.image_tokens, recipe.lm.projector,
                                  recipe.lm.fuse_question)
        self.set_stage(model, setup)
        return model

    def build_model(self, setup) -> nn.Module:
        model = MultimodalLM.from_configs(*self.parts)
        self.set_stage(model, setup)
        return InstructModel(model, setup.recipe.stage.loss_per == "conversation")

    def load_weights(self, model: nn.Module, setup) -> None:
        """Every base weight (LoRA's new ones excepted) from rank 0's CPU copy into the partitioned model."""
        reference = dict(self.reference(setup).named_parameters()) if rank() == 0 else {}
        for name, param in model.model.named_parameters():
            if "lora_" in name:
                continue
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0), torch.no_grad():
                if rank() == 0:
                    param.copy_(reference[name].to(param.dtype))
        if rank() == 0:
            trained = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
            total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
            print(f"[vlpretrain] instruction tuning stage {setup.recipe.stage.name}: {trained} of {total} parameters "
                  f"trainable ({100 * trained / total:.2f}%)", flush=True)

    def build_data(self, setup, rank: int, world: int):
        recipe = setup.recipe
        question = None if self.question_tokenizer is None else (self.question_tokenizer,
                                                                 self.encoder_config.max_position)
        targets = partial(conversation_targets, tokenizer=self.lm_tokenizer,
                          image_tokens=self.projector_config.tokens_per_image(self.encoder_config),
                          max_len=recipe.data.max_len, question=question)
        loader = make_train_loader(
            recipe.data.train, self.loader_tokenizer, batch_size=recipe.schedule.micro_batch_size, rank=rank,
            world_size=world, num_workers=recipe.data.num_workers, seed=recipe.seed,
            image_size=self.encoder_config.image_size, max_len=self.encoder_config.max_position,
            mode=recipe.data.mode, mlm_probability=0.0, crop_scale=recipe.data.crop_scale, hflip=recipe.data.hflip,
            randaugment=recipe.data.randaugment, max_bad_fraction=recipe.data.max_bad_fraction,
            min_side=recipe.data.min_side, sample_targets=targets)
        return loader, recipe.data.val

    def flops_per_sample(self, setup) -> Callable[[float], float]:
        """6 x parameters x tokens for the LM (dense transformer rule), plus the encoder side's forward (3x with
        backward when it trains): the ViT, and with fuse_question the instruction, counted at its padded length
        (an upper bound: the text and fusion encoders skip padding)."""
        lm_params = sum(p.numel() for p in _meta_lm(self.lm_config).parameters())
        question_tokens = self.encoder_config.max_position if self.projector_config.fuse_question else 0
        encoder = (3 if setup.recipe.stage.train_encoder else 1) * encoder_forward_flops(self.encoder_config,
                                                                                          question_tokens)
        return lambda tokens: 6 * lm_params * tokens + encoder

    def evaluate(self, engine, eval_data, setup, step: int, log: TrainLog, dtype: torch.dtype) -> dict:
        """Every rank answers its share of the held-out samples on the partitioned model (generate() with
        synced_gpus: ZeRO-3 needs every rank in every forward); rank 0 gathers the rows and scores them."""
        from pretrain.generate import DEFAULT_PROMPT, SCORES, answer_shards, instruct_metrics

        recipe, model, world = setup.recipe, engine.module.model, dist.get_world_size()
        options = {"max_new_tokens": recipe.eval.max_new_tokens, "do_sample": False, "synced_gpus": world > 1}
        was_training = model.training
        model.eval()
        rows, skipped, first = answer_shards(model, eval_data, DEFAULT_PROMPT, recipe.eval.samples,
                                             recipe.eval.batch_size, options, rank(), world)
        model.train(was_training)
        every_rank = [None] * world if rank() == 0 else None
        dist.gather_object(rows, every_rank, dst=0)
        metrics = {}
        if rank() == 0:
            metrics, examples = instruct_metrics([row for part in every_rank for row in part], skipped, first)
            save_eval_json(recipe.run_path / "instruct_eval.json", metrics)
            log.scalars(step, eval_scalars(metrics))
            if examples:
                log.image("eval/instruct_examples", answers_picture(examples), step)
            scores = {k: metrics[k] for k in SCORES if k in metrics}
            tqdm.write(f"[step {step}] held-out instructions: {json.dumps(scores)}")
        return metrics

    def export(self, engine, setup) -> Path:
        """<run>/export: the trained model (LoRA merged into the LM) as MultimodalLM.save_pretrained writes it."""
        out = setup.recipe.run_path / "export"
        copy = gathered_copy(engine.module, self, setup)
        if dist.get_rank() == 0:
            if hasattr(copy.lm, "merge_and_unload"):
                copy.lm = copy.lm.merge_and_unload()
            copy.save_pretrained(out)
        dist.barrier()
        return out


def eval_scalars(metrics: dict) -> dict[str, float]:
    """TensorBoard's eval/*: the caption scores, and VQA accuracy and its baseline, overall and per type."""
    scalars = {f"eval/{k}": v for k, v in metrics.get("captioning", {}).items() if k != "captions"}
    scalars |= {f"eval/held_out_phrasings/{k}": v
                for k, v in metrics.get("captioning_held_out_phrasings", {}).items() if k != "captions"}
    vqa = metrics.get("vqa")
    if vqa:
        scalars |= {"eval/vqa_accuracy": vqa["accuracy"], "eval/vqa_majority_baseline": vqa["majority_baseline"]}
        scalars |= {f"eval/vqa_{kind}_accuracy": t["accuracy"] for kind, t in vqa["per_type"].items()}
    return scalars


def conversation_targets(meta: dict, *, tokenizer, image_tokens: int, max_len: int,
                         question: tuple[object, int] | None = None) -> dict | None:
    """A sample's conversation as LM tensors; with `question` = (the pretraining tokenizer, a length), also its
    first instruction in that tokenizer's ids padded to the length (question_ids, question_mask). None (the
    loader counts it as no_targets) when it has no answer or is longer than max_len."""
    messages = meta.get("conversations")
    if not messages or not has_assistant_turn(messages):
        return None
    targets = tokenize_conversation(messages, tokenizer, image_tokens, max_len)
    if targets is not None and question is not None:
        encoded = tokenize(question[0], [first_instruction(messages)], question[1])
        targets |= {"question_ids": encoded["input_ids"][0], "question_mask": encoded["attention_mask"][0]}
    return targets


def _meta_lm(lm_config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(lm_config)


def gathered_copy(module: InstructModel, task: InstructTask, setup) -> MultimodalLM | None:
    """On rank 0, a CPU MultimodalLM holding the engine's current weights (one parameter gathered at a time,
    every rank taking part); None elsewhere."""
    copy = task.reference(setup) if rank() == 0 else None
    targets = dict(copy.named_parameters()) if copy is not None else {}
    for name, param in module.model.named_parameters():
        with deepspeed.zero.GatheredParameters([param]), torch.no_grad():
            if copy is not None:
                targets[name].copy_(param.detach().to(targets[name].dtype).cpu())
    return copy
