"""Tiny pieces for the multimodal LM tests: a pretraining export of the tiny preset (untrained weights, seeded)
and a small Llama-architecture causal LM with a byte-level BPE tokenizer, both written to disk as the real ones."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_model

from data_pipeline.lm_tokenizer import train_lm_tokenizer
from data_pipeline.text import clean_caption
from data_pipeline.train_tokenizer import train_tokenizer
from pretrain.caption_lm.task import build_lm
from pretrain.model import ALBEF
from tests.helpers.model import VOCAB, tiny_config

TEXTS = [
    "A large red circle in the top left on a white background.",
    "Two small blue squares at the bottom and a green triangle on a gray background.",
    "There is a big purple diamond in the middle against a black backdrop.",
    "USER: ASSISTANT: Describe the image briefly. What is in this picture?",
]


def write_export(out: Path, seed: int = 0) -> Path:
    """model.safetensors + model_config.json + tokenizer/ as `make pretrain` writes them (the parts the LM path
    reads; the tokenizer is trained on TEXTS to the tiny preset's vocabulary)."""
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ALBEF(tiny_config())
    save_model(model, str(out / "model.safetensors"))
    (out / "model_config.json").write_text(json.dumps(asdict(model.config)))
    train_tokenizer([clean_caption(t) for t in TEXTS], str(out / "tokenizer"), vocab_size=VOCAB, min_frequency=1)
    return out


def write_lm(out: Path, hidden: int = 64, extra_tokens: int = 0, seed: int = 0, texts: list[str] = TEXTS) -> Path:
    """A 2-layer Llama LM (random weights) and its tokenizer (trained on `texts`), saved with save_pretrained.
    `extra_tokens` adds tokens to the tokenizer after the LM was built (a tokenizer that does not fit its LM)."""
    tokenizer = train_lm_tokenizer([*texts, *TEXTS] * 4, vocab_size=1000)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lm = build_lm(len(tokenizer), hidden, layers=2, heads=4, context=256, tokenizer=tokenizer)
    tokenizer.add_tokens([f"<extra{i}>" for i in range(extra_tokens)])
    lm.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
