"""Caption-LM pretraining as the training loop sees it (pretrain.train.task): a Llama-architecture causal LM
built partitioned from a config, next-token training on the caption text of the shared loader's samples,
held-out caption loss at evaluation, and a save_pretrained export that AutoModelForCausalLM loads.

A sample is one image's captions, each `<s>caption</s>`, as many as fit `data.max_len` (the loader's
per-sample targets, data_pipeline.loader); the loader's pixels and its caption copy are not used.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import NamedTuple

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

# imported here, not inside DeepSpeed's zero.Init (whose Tensor.__new__ patch breaks torch._dynamo's import)
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.initialization import no_init_weights

from data_pipeline import make_train_loader, resolve_shards
from data_pipeline.samples import parse_sample, read_samples
from pretrain.batch import to_device
from pretrain.distributed import rank
from pretrain.eval.retrieval import save_eval_json
from pretrain.train.metrics import TrainLog

IGNORE = -100
LOADER_IMAGE_SIZE = 32  # the loader decodes every sample's image; this task never looks at it
LOADER_CAPTION_TOKENS = 32  # the loader's own (unused) caption copy


def build_lm(vocab_size: int, hidden: int, layers: int, heads: int, context: int, tokenizer, init: bool = True):
    """A Llama-architecture causal LM from its config; `init=False` skips the initialisation (as transformers
    does under ZeRO-3: the engine initialises the partitioned weights one module at a time)."""
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=3 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=context, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    if init:
        return LlamaForCausalLM(config)
    with no_init_weights():
        lm = LlamaForCausalLM(config)
    lm.tie_weights()  # part of the skipped initialisation
    return lm


def caption_text_targets(meta: dict, *, tokenizer, max_len: int) -> dict | None:
    """The sample's captions (its json's `captions`, as written) as one LM sequence padded to max_len, labels on
    every real token; None (the loader counts it) when there is no caption or the first one does not fit."""
    ids: list[int] = []
    for caption in meta.get("captions") or []:
        if not isinstance(caption, str) or not caption.strip():
            continue
        piece = tokenizer(f"{tokenizer.bos_token}{caption}{tokenizer.eos_token}", add_special_tokens=False)["input_ids"]
        if len(ids) + len(piece) > max_len:
            break
        ids += piece
    if not ids:
        return None
    padding = max_len - len(ids)
    return {"input_ids": torch.tensor(ids + [tokenizer.pad_token_id] * padding),
            "attention_mask": torch.tensor([1] * len(ids) + [0] * padding),
            "labels": torch.tensor(ids + [IGNORE] * padding)}


class CaptionLMOutput(NamedTuple):
    loss: Tensor
    token_accuracy: Tensor  # next-token accuracy on the labelled tokens
    labelled_tokens: Tensor


class CaptionLM(nn.Module):
    """The engine's module: the causal LM called with the loader's batch dict."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, batch: dict) -> CaptionLMOutput:
        logits = self.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits, targets = logits[:, :-1].float(), batch["labels"][:, 1:]
        labelled = targets != IGNORE
        count = labelled.sum()
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
        accuracy = ((logits.argmax(-1) == targets) & labelled).sum() / count.clamp(min=1)
        return CaptionLMOutput(loss / count.clamp(min=1), accuracy.detach(), count.float())

    @torch.no_grad()
    def init_weights(self, module: nn.Module) -> None:
        self.lm._init_weights(module)


class CaptionLMTask:
    frozen_is_base = False  # everything trains

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def _lm(self, setup, init: bool = True):
        arch = setup.recipe.lm
        return build_lm(len(self.tokenizer), arch.hidden, arch.layers, arch.heads, arch.context, self.tokenizer, init)

    def build_model(self, setup) -> nn.Module:
        return CaptionLM(self._lm(setup, init=False))

    def load_weights(self, model: nn.Module, setup) -> None:
        if rank() == 0:
            total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
            print(f"[vlpretrain] caption LM: {total} parameters, vocabulary {len(self.tokenizer)}", flush=True)

    def build_data(self, setup, rank: int, world: int):
        recipe = setup.recipe
        targets = partial(caption_text_targets, tokenizer=self.tokenizer, max_len=recipe.data.max_len)
        loader = make_train_loader(
            recipe.data.train, setup.tokenizer, batch_size=recipe.schedule.micro_batch_size, rank=rank,
            world_size=world, num_workers=recipe.data.num_workers, seed=recipe.seed, image_size=LOADER_IMAGE_SIZE,
            max_len=LOADER_CAPTION_TOKENS, mode=recipe.data.mode, mlm_probability=0.0, crop_scale=(1.0, 1.0),
            max_bad_fraction=recipe.data.max_bad_fraction, sample_targets=targets)
        eval_data = held_out_batches(recipe.data.val, targets, recipe.eval.samples, recipe.eval.batch_size) \
            if recipe.data.val else None
        return loader, eval_data

    def flops_per_sample(self, setup) -> Callable[[float], float]:
        """6 x parameters x tokens (dense transformer rule)."""
        with torch.device("meta"):
            params = sum(p.numel() for p in self._lm(setup, init=False).parameters())
        return lambda tokens: 6 * params * tokens

    def evaluate(self, engine, eval_data, setup, step: int, log: TrainLog, dtype: torch.dtype) -> dict:
        """Next-token loss and accuracy on the held-out captions; every rank runs every batch (ZeRO-3)."""
        loss = correct = tokens = 0.0
        with torch.no_grad():
            for batch in eval_data:
                out = engine.module(to_device(batch, engine.device, dtype))
                loss += out.loss.item() * out.labelled_tokens.item()
                correct += out.token_accuracy.item() * out.labelled_tokens.item()
                tokens += out.labelled_tokens.item()
        metrics = {"loss": loss / tokens, "token_accuracy": correct / tokens, "tokens": int(tokens)}
        if dist.get_rank() == 0:
            save_eval_json(setup.recipe.run_path / "eval.json", metrics)
            log.scalars(step, {"eval/loss": metrics["loss"], "eval/token_accuracy": metrics["token_accuracy"]})
            tqdm.write(f"[step {step}] held-out captions: loss {metrics['loss']:.4f}, "
                       f"token accuracy {metrics['token_accuracy']:.4f} over {int(tokens)} tokens")
        return metrics

    def export(self, engine, setup) -> Path:
        """<run>/export: the LM and its tokenizer as save_pretrained writes them (a Hub-style directory)."""
        out = setup.recipe.run_path / "export"
        copy = self._lm(setup) if rank() == 0 else None
        targets = dict(copy.named_parameters()) if copy is not None else {}
        for name, param in engine.module.lm.named_parameters():
            with deepspeed.zero.GatheredParameters([param]), torch.no_grad():
                if copy is not None:
                    targets[name].copy_(param.detach().to(targets[name].dtype).cpu())
        if rank() == 0:
            copy.save_pretrained(out)
            self.tokenizer.save_pretrained(out)
        dist.barrier()
        return out


def held_out_batches(spec: str, targets: Callable[[dict], dict | None], samples: int,
                     batch_size: int) -> list[dict]:
    """The first `samples` held-out images' caption sequences, in batches."""
    rows, skipped = [], Counter()
    for raw in read_samples([s.path for s in resolve_shards(spec).shards], skipped):
        parsed = parse_sample(raw, skipped)
        row = targets({"captions": parsed.captions}) if parsed else None
        if row is not None:
            rows.append(row)
        if len(rows) == samples:
            break
    return [{k: torch.stack([r[k] for r in rows[i:i + batch_size]]) for k in rows[0]}
            for i in range(0, len(rows), batch_size)]
