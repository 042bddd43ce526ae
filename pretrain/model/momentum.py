"""ALBEF's momentum distillation: an EMA teacher of the encoders and heads, and a queue of its ITC features.

The teacher is an exponential moving average (`config.momentum`, 0.995) of the image encoder, text encoder,
projections, fusion encoder and MLM head. Its parameters never take a gradient (requires_grad False), so
no optimizer holds them; under ZeRO-3 they are partitioned like the model's, and each rank moves its own
partitions toward the online model's, with no communication (`follow`). Parameters and buffers alike ride
in DeepSpeed's checkpoints (frozen parameters as each rank's fragments, the queue and step count in the
module state).

The EMA step runs at the end of each training forward, after the teacher has taught: at the start of a
forward ZeRO-3 may already be prefetching the teacher's partitions (the whole tiny model fits in one
prefetch bucket), and an update then would race the gather. So forward t uses the teacher that followed
the online weights of forward t-1 (ALBEF updates first and uses the online weights of forward t: a lag of
one step against a time constant of 200).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.distributed import gather_no_grad

from .bert import TextEncoder
from .config import ModelConfig
from .fusion import build_fusion_encoder
from .heads import MLMHead
from .objectives import at_least_fp32
from .padding import KeyPadding
from .vit import VisionTransformer


def online_config(config: ModelConfig) -> ModelConfig:
    """The configuration of the online model alone (what an export holds)."""
    return dataclasses.replace(config, momentum_distillation=False, queue_size=0, distill_alpha_ramp_steps=0,
                               momentum_every=1)


def online_state_dict(state: dict) -> dict:
    """A full model's state without the teacher's weights, queue and count (ALBEF keeps them in `momentum`)."""
    return {name: value for name, value in state.items() if not name.startswith("momentum.")}


class Teacher(NamedTuple):
    """The momentum model's view of a batch (no gradient)."""

    image_feat: Tensor  # [B, E] L2-normalised ITC features, fp32
    text_feat: Tensor
    mlm_probs: Tensor  # [masked tokens, vocab]: its token distribution at the masked positions, fp32
    alpha: Tensor  # the weight of its distributions in the targets now


class FeatureQueue(nn.Module):
    """A ring of the teacher's ITC features from past global batches, each with its image id (-1: an empty
    slot). Buffers, so checkpoints carry them; equal on every rank (filled from the gathered batch)."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("image_feat", torch.zeros(size, dim))
        self.register_buffer("text_feat", torch.zeros(size, dim))
        self.register_buffer("image_ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("position", torch.zeros(1, dtype=torch.long))  # the next slot to overwrite

    @torch.no_grad()
    def enqueue(self, image_feat: Tensor, text_feat: Tensor, image_ids: Tensor) -> None:
        """Write the rows [B, ...] over the oldest entries, in order, wrapping around the end."""
        size = len(self.image_ids)
        if not size:
            return
        rows = len(image_ids)
        # as if written one by one: with more rows than slots only the newest `size` remain
        slots = ((self.position + torch.arange(rows, device=image_ids.device)) % size)[-size:]
        self.image_feat.index_copy_(0, slots, image_feat[-size:].to(self.image_feat.dtype))
        self.text_feat.index_copy_(0, slots, text_feat[-size:].to(self.text_feat.dtype))
        self.image_ids.index_copy_(0, slots, image_ids[-size:])
        self.position.copy_((self.position + rows) % size)


def _held_pairs(teacher: nn.Parameter, student: nn.Parameter) -> Iterator[tuple[Tensor, Tensor]]:
    """The pieces of a teacher parameter and its student this rank holds, in the same layout: under ZeRO-3
    its partition (the same slice of both) and, while ZeRO-3 holds the teacher's whole tensor too, the
    whole; otherwise the whole tensor. (ZeRO-3 releases a teacher parameter after each use, small
    "persistent" ones included, as the optimizer does not hold them: the next use gathers the partitions.)"""
    if hasattr(teacher, "ds_tensor"):
        yield teacher.ds_tensor, student.ds_tensor
        if not teacher.data.numel():
            return
    yield teacher.data, student.data


class MomentumTeacher(nn.Module):
    """The EMA copies (named as the online model's modules), the feature queue, and the training-forward
    count that ramps alpha."""

    def __init__(self, config: ModelConfig, backend: str):
        super().__init__()
        self.config = config
        self.image_encoder = VisionTransformer(config, backend)
        self.text_encoder = TextEncoder(config, backend)
        self.fusion_encoder = build_fusion_encoder(config, backend)
        self.vision_proj = nn.Linear(config.vision_hidden, config.embed_dim)
        self.text_proj = nn.Linear(config.text_hidden, config.embed_dim)
        self.mlm_head = MLMHead(config, self.text_encoder.embeddings.word_embeddings)
        self.requires_grad_(False)
        self.queue = FeatureQueue(config.queue_size, config.embed_dim)
        self.register_buffer("steps", torch.zeros(1, dtype=torch.long))  # training forwards so far

    def alpha(self) -> Tensor:
        """The distillation weight: distill_alpha, ramped linearly from 0 over distill_alpha_ramp_steps."""
        c = self.config
        ramp = (self.steps[0] / c.distill_alpha_ramp_steps).clamp(max=1.0) if c.distill_alpha_ramp_steps else 1.0
        return c.distill_alpha * torch.as_tensor(ramp, dtype=torch.float32, device=self.steps.device)

    @torch.no_grad()
    def forward(self, batch: dict) -> Teacher:
        """ITC features of the batch's images and captions, and the token distribution at its masked positions
        from the fused masked captions (as the online model computes its own)."""
        mask = batch["attention_mask"]
        image_embeds = self.image_encoder(batch["pixel_values"])
        both = self.text_encoder(
            torch.cat([batch["input_ids"], batch["mlm_input_ids"]]), KeyPadding(torch.cat([mask, mask]).bool())
        )
        text_embeds, masked_text_embeds = both.chunk(2)
        fused = self.fusion_encoder(masked_text_embeds, KeyPadding(mask.bool()), image_embeds)
        masked = batch["mlm_labels"] != -100
        return Teacher(
            image_feat=F.normalize(at_least_fp32(self.vision_proj(image_embeds[:, 0])), dim=-1),
            text_feat=F.normalize(at_least_fp32(self.text_proj(text_embeds[:, 0])), dim=-1),
            mlm_probs=at_least_fp32(self.mlm_head(fused[masked])).softmax(dim=-1),
            alpha=self.alpha(),
        )

    @torch.no_grad()
    def copy_from(self, online: nn.Module) -> None:
        """Start the teacher as a copy of the online model (after its initialisation and pretrained weights)."""
        for name, mine in self.named_parameters():
            for held, theirs in _held_pairs(mine, online.get_parameter(name)):
                held.copy_(theirs)

    @torch.no_grad()
    def update(self, online: nn.Module, teacher: Teacher, image_ids: Tensor) -> None:
        """After a training forward: queue the global batch's teacher features, count the forward, and once per
        optimizer update (every `momentum_every` forwards) take one EMA step toward the online model on what
        this rank holds (m <- momentum * m + (1 - momentum) * p)."""
        self.queue.enqueue(*map(gather_no_grad, (teacher.image_feat, teacher.text_feat, image_ids)))
        due = int(self.steps[0]) % self.config.momentum_every == 0  # one forward per update: all see the same weights
        self.steps += 1
        if not due:
            return
        momentum = self.config.momentum
        for name, mine in self.named_parameters():
            for held, theirs in _held_pairs(mine, online.get_parameter(name)):
                # two rounded products and a rounded sum: add_(alpha=) may fuse them in vectorised loops
                # but not in their tails, and a partition's tail is not the whole tensor's
                held.mul_(momentum).add_(theirs * (1 - momentum))
