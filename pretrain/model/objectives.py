"""ALBEF's three objectives and the optional caption-word one, each one function that owns its whole computation.

Under torch.distributed, ITC scores each rank's rows against the global batch (features gathered with
gradient; memory O(B_local x B_global)), so averaging the ranks' gradients equals one process on the
whole batch. The gathers live in `pretrain.distributed`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.distributed import gather_no_grad, gather_with_grad


def at_least_fp32(x: Tensor) -> Tensor:
    """Half-precision values in fp32 for the loss arithmetic; fp32 and fp64 stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class ITCResult(NamedTuple):
    loss: Tensor
    sim_i2t: Tensor  # [B_local, B_global] fp32, divided by the temperature
    sim_t2i: Tensor
    positives: Tensor  # [B_local, B_global] True where both sides show the same image
    positive_sim: Tensor  # mean cosine similarity of matching pairs (no gradient)
    negative_sim: Tensor  # mean cosine similarity of the other pairs in the global batch


class HardNegatives(NamedTuple):
    """One extra caption per local row (NegCLIP: the row's caption with a word swapped): ITC features [B, E]
    and whether the row holds one [B] (bool; False: the row's caption had nothing to swap)."""

    text_feat: Tensor
    valid: Tensor


def itc_loss(image_feat: Tensor, text_feat: Tensor, image_ids: Tensor, temperature: Tensor,
             hard_negatives: HardNegatives | None = None) -> ITCResult:
    """Image-text contrastive loss: symmetric InfoNCE over the global batch, the target mass spread evenly
    over every caption of the same image. Similarities are computed in fp32 whatever the model's dtype:
    a bf16 logit of magnitude ~14 would be rounded to steps of 0.0625. With `hard_negatives` the global
    batch's valid ones are extra image-to-text columns without target mass (text-to-image is unchanged); the
    result's similarities still cover the batch's captions only."""
    with torch.autocast(image_feat.device.type, enabled=False):
        image_feat, text_feat, temperature = map(at_least_fp32, (image_feat, text_feat, temperature))
        sim_i2t = image_feat @ gather_with_grad(text_feat).T / temperature
        sim_t2i = text_feat @ gather_with_grad(image_feat).T / temperature
        logits_i2t = sim_i2t
        if hard_negatives is not None:
            logits_i2t = torch.cat([sim_i2t, _hard_negative_logits(image_feat, hard_negatives, temperature)], dim=1)
    positives = image_ids[:, None] == gather_no_grad(image_ids)[None, :]
    targets = positives.to(sim_i2t.dtype) / positives.sum(dim=1, keepdim=True)
    # the extra columns' log-probabilities are dropped, not multiplied by 0: a masked one is -inf
    loss_i2t = -(F.log_softmax(logits_i2t, dim=1)[:, : sim_i2t.shape[1]] * targets).sum(dim=1).mean()
    loss_t2i = -(F.log_softmax(sim_t2i, dim=1) * targets).sum(dim=1).mean()
    return ITCResult((loss_i2t + loss_t2i) / 2, sim_i2t, sim_t2i, positives,
                     *_similarity_statistics(sim_i2t, temperature, positives))


def _hard_negative_logits(image_feat: Tensor, hard_negatives: HardNegatives, temperature: Tensor) -> Tensor:
    """[B_local, B_global]: each image against the global batch's hard negatives, -inf where a row has none."""
    text_feat = gather_with_grad(at_least_fp32(hard_negatives.text_feat))
    valid = gather_no_grad(hard_negatives.valid.to(torch.uint8)).bool()  # gloo gathers no bool tensors
    return (image_feat @ text_feat.T / temperature).masked_fill(~valid[None, :], float("-inf"))


@torch.no_grad()
def _similarity_statistics(sim_i2t: Tensor, temperature: Tensor, positives: Tensor) -> tuple[Tensor, Tensor]:
    """Mean cosine similarity of the positive pairs and of the others."""
    cosine = sim_i2t * temperature
    positive_sim = (cosine * positives).sum() / positives.sum()
    negative_sim = (cosine * ~positives).sum() / (~positives).sum().clamp(min=1)
    return positive_sim, negative_sim


class QueuedFeatures(NamedTuple):
    """Keys from past batches: ITC features [Q, E] and their image ids [Q] (-1: an empty slot)."""

    image_feat: Tensor
    text_feat: Tensor
    image_ids: Tensor


def itc_distill_loss(image_feat: Tensor, text_feat: Tensor, image_ids: Tensor, temperature: Tensor,
                     teacher_image_feat: Tensor, teacher_text_feat: Tensor, queue: QueuedFeatures,
                     alpha: Tensor | float, hard_negatives: HardNegatives | None = None) -> ITCResult:
    """ITC with momentum distillation (ALBEF): each rank's online features against the teacher's keys, the
    global batch's then the queue's (no gradient through the keys). Positives are the keys of the same image
    id, queued ones included (image ids are non-negative; empty slots take no part). The target is
    (1 - alpha) * the ground truth (spread evenly over the positives) + alpha * the teacher's own softmax
    similarities over the same keys. `hard_negatives` are extra image-to-text columns without target mass, as
    in `itc_loss`. The result's similarities and positives cover the global batch's keys only (what ITM draws
    its negatives from)."""
    batch_ids = gather_no_grad(image_ids)
    key_ids = torch.cat([batch_ids, queue.image_ids])
    with torch.autocast(image_feat.device.type, enabled=False):
        image_feat, text_feat, temperature = map(at_least_fp32, (image_feat, text_feat, temperature))
        dtype = image_feat.dtype
        image_keys = torch.cat([gather_no_grad(teacher_image_feat), queue.image_feat]).to(dtype)
        text_keys = torch.cat([gather_no_grad(teacher_text_feat), queue.text_feat]).to(dtype)
        sim_i2t = image_feat @ text_keys.T / temperature
        sim_t2i = text_feat @ image_keys.T / temperature
        with torch.no_grad():
            teacher_i2t = teacher_image_feat.to(dtype) @ text_keys.T / temperature
            teacher_t2i = teacher_text_feat.to(dtype) @ image_keys.T / temperature
        extra_i2t = None if hard_negatives is None else _hard_negative_logits(image_feat, hard_negatives, temperature)
    empty = (key_ids < 0)[None, :]
    positives = image_ids[:, None] == key_ids[None, :]
    truth = positives.to(sim_i2t.dtype) / positives.sum(dim=1, keepdim=True)

    def distilled(sim: Tensor, teacher_sim: Tensor, extra: Tensor | None = None) -> Tensor:
        lowest = torch.finfo(sim.dtype).min  # not -inf: 0 * log(0) must be 0 at an empty slot, not NaN
        with torch.no_grad():
            targets = alpha * teacher_sim.masked_fill(empty, lowest).softmax(dim=1) + (1 - alpha) * truth
        logits = sim.masked_fill(empty, lowest)
        if extra is not None:  # dropped after the softmax, as in itc_loss
            logits = torch.cat([logits, extra], dim=1)
        return -(F.log_softmax(logits, dim=1)[:, : sim.shape[1]] * targets).sum(dim=1).mean()

    loss = (distilled(sim_i2t, teacher_i2t, extra_i2t) + distilled(sim_t2i, teacher_t2i)) / 2
    in_batch = len(batch_ids)
    sim_i2t, sim_t2i, positives = sim_i2t[:, :in_batch], sim_t2i[:, :in_batch], positives[:, :in_batch]
    return ITCResult(loss, sim_i2t, sim_t2i, positives, *_similarity_statistics(sim_i2t, temperature, positives))


@torch.no_grad()
def sample_itm_negatives(itc: ITCResult, hardness: float = 1.0) -> tuple[Tensor, Tensor]:
    """Hard negatives for ITM: for each local image a global text index, for each local text a global image
    index, drawn in proportion to softmax(hardness * similarity / temperature) over every pair with a
    different image id (ALBEF: hardness 1; 0 draws uniformly from the other images).

    One multinomial call for both directions, no host sync. A row whose global batch shows only its own
    image has no negative to offer: it draws uniformly from the whole batch. Non-finite similarities (a NaN
    batch on any rank) count as 0, so sampling still works; the step's loss is non-finite and DeepSpeed
    skips it.
    """
    positives = torch.cat([itc.positives, itc.positives])
    no_negative = positives.all(dim=1, keepdim=True)
    similarities = hardness * torch.cat([itc.sim_i2t, itc.sim_t2i]).nan_to_num(0.0).masked_fill(no_negative, 0.0)
    weights = similarities.masked_fill(positives & ~no_negative, float("-inf")).softmax(dim=1)
    negative_texts, negative_images = torch.multinomial(weights, 1).squeeze(1).chunk(2)
    return negative_texts, negative_images


def itm_loss(itm_head: nn.Module, positive: Tensor, negative_text: Tensor, negative_image: Tensor
             ) -> tuple[Tensor, Tensor]:
    """Image-text matching: 2-way cross-entropy (index 1 = match) on the fused [CLS] of the matched pairs
    and of the two kinds of hard negative (each image with another caption, each caption with another
    image), each [B, L, D]. Returns the loss and the accuracy (no gradient)."""
    cls = torch.cat([positive[:, 0], negative_text[:, 0], negative_image[:, 0]])
    labels = torch.zeros(len(cls), dtype=torch.long, device=cls.device)
    labels[: len(positive)] = 1
    logits = at_least_fp32(itm_head(cls))
    accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
    return F.cross_entropy(logits, labels), accuracy


def mlm_loss(mlm_head: nn.Module, masked_text: Tensor, mlm_labels: Tensor, teacher_probs: Tensor | None = None,
             alpha: Tensor | float = 0.0) -> tuple[Tensor, Tensor]:
    """Masked language modelling: the head on the fused states [B, L, D] of the masked positions only
    (labels other than -100), cross-entropy against the original tokens; 0 when nothing is masked.
    With `teacher_probs` (the momentum model's token distribution at the masked positions, [masked, V]) the
    target is (1 - alpha) * the original token + alpha * that distribution (ALBEF's MLM distillation).
    The means are over this rank's masked tokens. Returns the loss and the masked-token accuracy (no gradient)."""
    masked = mlm_labels != -100
    labels = mlm_labels[masked]
    logits = at_least_fp32(mlm_head(masked_text[masked]))
    total = F.cross_entropy(logits, labels, reduction="sum")
    if teacher_probs is not None:
        distilled = -(F.log_softmax(logits, dim=1) * teacher_probs).sum()
        total = (1 - alpha) * total + alpha * distilled
    count = masked.sum().clamp(min=1)
    accuracy = (logits.detach().argmax(dim=1) == labels).sum() / count
    return total / count, accuracy


def caption_words_loss(logits: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Caption-word classification (SuperClass, Huang et al. 2024, after Joulin et al. 2016): from the image
    alone, which vocabulary tokens its caption contains. `logits` [B, V] come from the image; the target is
    the caption's token set (each token once however often it occurs), normalised to sum 1, against the
    softmax over the vocabulary. Padding and each caption's first and last real token ([CLS], [SEP]) are
    not words."""
    words = attention_mask.bool().clone()
    words[:, 0] = False
    words[torch.arange(len(words), device=words.device), attention_mask.sum(dim=1) - 1] = False
    logits = at_least_fp32(logits)
    present = torch.zeros_like(logits).scatter_add_(1, input_ids, words.to(logits.dtype)).clamp_(max=1)
    targets = present / present.sum(dim=1, keepdim=True).clamp(min=1)
    return -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()
