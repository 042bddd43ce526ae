"""The embedded default LM for instruction tuning: a small Llama-architecture causal LM built from a
transformers config, with a byte-level BPE tokenizer trained on the caption text, pretrained briefly on
that text so that it speaks the synthetic language before it ever sees an image.

    python -m pretrain.caption_lm --shards data/shards/synthetic/train --out data/caption-lm

The result is a plain Hugging Face directory (save_pretrained): `AutoModelForCausalLM` and `AutoTokenizer`
load it, and `python -m pretrain.instruct` takes it like any Hub name. This bootstrap is a few CPU minutes
of next-token training on one process (AdamW, linear warmup), not a distributed run.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from data_pipeline import DataError, resolve_shards
from data_pipeline.lm_tokenizer import train_lm_tokenizer
from data_pipeline.samples import parse_sample, read_samples


def shard_texts(spec: str) -> list[str]:
    """Every caption of the shard set, as written (case and punctuation kept)."""
    from collections import Counter

    skipped, texts = Counter(), []
    for raw in read_samples([s.path for s in resolve_shards(spec).shards], skipped):
        parsed = parse_sample(raw, skipped)
        texts += parsed.captions if parsed else []
    if not texts:
        raise DataError(f"{spec} holds no caption (skipped: {dict(skipped)}); build it with make shards")
    return texts


def build_lm(vocab_size: int, hidden: int, layers: int, heads: int, context: int, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=3 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=context, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def text_batch(texts: list[str], tokenizer) -> dict[str, torch.Tensor]:
    batch = tokenizer([f"{tokenizer.bos_token}{t}{tokenizer.eos_token}" for t in texts], add_special_tokens=False,
                      padding=True, return_tensors="pt")
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def pretrain_lm(lm, tokenizer, texts: list[str], steps: int, batch_size: int, lr: float, seed: int) -> list[float]:
    """Next-token training on random caption batches; the loss of every step."""
    rng, losses = random.Random(seed), []
    optimizer = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    lm.train()
    for _ in (bar := tqdm(range(steps), desc="caption LM", dynamic_ncols=True)):
        loss = lm(**text_batch(rng.sample(texts, batch_size), tokenizer)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.caption_lm", description=__doc__.split("\n")[0])
    parser.add_argument("--shards", default="data/shards/synthetic/train", help="caption shards (train split)")
    parser.add_argument("--out", type=Path, default=Path("data/caption-lm"), help="output directory")
    parser.add_argument("--vocab-size", type=int, default=1000, help="BPE vocabulary size at most (1000)")
    parser.add_argument("--hidden", type=int, default=128, help="LM width (128)")
    parser.add_argument("--layers", type=int, default=2, help="LM layers (2)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (4)")
    parser.add_argument("--context", type=int, default=256, help="max_position_embeddings (256)")
    parser.add_argument("--steps", type=int, default=80,
                        help="pretraining steps (80: the loss is flat from about step 60 on)")
    parser.add_argument("--batch-size", type=int, default=32, help="captions per step (32)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (3e-3)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        texts = shard_texts(args.shards)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    torch.manual_seed(args.seed)
    tokenizer = train_lm_tokenizer(texts, args.vocab_size)
    lm = build_lm(len(tokenizer), args.hidden, args.layers, args.heads, args.context, tokenizer)
    losses = pretrain_lm(lm, tokenizer, texts, args.steps, min(args.batch_size, len(texts)), args.lr, args.seed)
    lm.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    tail = losses[-10:]
    print(f"caption LM: {sum(p.numel() for p in lm.parameters())} parameters, vocab {len(tokenizer)}, "
          f"loss {losses[0]:.3f} -> {sum(tail) / len(tail):.3f} (mean of the last {len(tail)} steps); "
          f"saved to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
