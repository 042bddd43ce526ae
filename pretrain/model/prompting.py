"""Classes as text: class embeddings from prompt features, and learned prompt context (CoOp).

A class is scored by the cosine similarity of an image's ITC feature with the class embedding: the mean of
the normalised text features of all the class's prompts (templates x label words), normalised again, as
CLIP ensembles templates. Learned context replaces the hand-written words around the label by M vectors in
the text encoder's word-embedding space, fed to the frozen text encoder in place of word embeddings:
[CLS] v_1 ... v_M <label words> [SEP]. The vectors are shared by all classes or one set per class.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .albef import ALBEF
from .padding import KeyPadding


def class_embeddings(features: Tensor, owner: Tensor, num_classes: int) -> Tensor:
    """[C, E]: per class, the mean of its prompts' normalised features [P, E] (`owner` [P]: each prompt's
    class), normalised again."""
    features = F.normalize(features.float(), dim=-1)
    sums = features.new_zeros(num_classes, features.shape[1]).index_add_(0, owner, features)
    counts = torch.bincount(owner, minlength=num_classes)
    if bool((counts == 0).any()):
        raise ValueError(f"classes {(counts == 0).nonzero().flatten().tolist()} have no prompt")
    return F.normalize(sums / counts[:, None], dim=-1)


def insert_context_slots(input_ids: Tensor, attention_mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Tokenised label words [P, L] ([CLS] first) -> [P, length + L] with `length` real slots after [CLS] for
    the context vectors (their ids are [CLS]'s: only their positions matter, the vectors replace them)."""
    slots = input_ids[:, :1].expand(-1, length)
    return (torch.cat([input_ids[:, :1], slots, input_ids[:, 1:]], dim=1),
            torch.cat([attention_mask[:, :1].expand(-1, length + 1), attention_mask[:, 1:]], dim=1))


class LearnedContext(nn.Module):
    """M context vectors [M, D] (shared) or [C, M, D] (class-specific), placed after [CLS]."""

    def __init__(self, init: Tensor, num_classes: int | None = None):
        super().__init__()
        vectors = init.detach().clone().float()
        if num_classes is not None and vectors.dim() == 2:
            vectors = vectors.expand(num_classes, -1, -1).clone()
        self.vectors = nn.Parameter(vectors)

    @property
    def length(self) -> int:
        return self.vectors.shape[-2]

    @property
    def class_specific(self) -> bool:
        return self.vectors.dim() == 3

    def encode(self, model: ALBEF, input_ids: Tensor, attention_mask: Tensor, owner: Tensor) -> tuple[Tensor, Tensor]:
        """Text token states [P, L, D] and ITC features [P, E] of prompts laid out by insert_context_slots;
        `owner` [P] picks each prompt's class context when it is class-specific."""
        words = model.text_encoder.embeddings.word_embeddings(input_ids)
        context = self.vectors[owner] if self.class_specific else self.vectors.expand(len(input_ids), -1, -1)
        words = torch.cat([words[:, :1], context.to(words.dtype), words[:, 1 + self.length :]], dim=1)
        text_embeds = model.text_encoder(input_ids, KeyPadding(attention_mask.bool()), inputs_embeds=words)
        return text_embeds, model.text_feature(text_embeds)

    def save(self, path: Path, metadata: dict) -> None:
        """safetensors file with `metadata` (JSON-able) beside the vectors; written beside and renamed."""
        temporary = path.with_name(path.name + ".tmp")
        save_file({"context": self.vectors.detach().cpu().contiguous()}, str(temporary),
                  metadata={"prompt": json.dumps(metadata)})
        temporary.replace(path)

    @classmethod
    def load(cls, path: Path) -> tuple[LearnedContext, dict]:
        with safe_open(str(path), framework="pt") as handle:
            metadata = json.loads((handle.metadata() or {}).get("prompt", "null"))
        tensors = load_file(str(path))
        if metadata is None or set(tensors) != {"context"}:
            raise ValueError(f"{path} is not a learned prompt file: write one with `python -m pretrain.prompt_tune`")
        return cls(tensors["context"]), metadata
