"""ALBEF's three losses, each one short function, plus the cross-rank plumbing ITC and ITM need.

When torch.distributed is initialised, features are gathered with gradient and each rank computes its
local rows against the global batch (OpenCLIP's local-loss formulation: memory O(B_local x B_global));
averaging the ranks' gradients then equals one process on the whole batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        out = x.new_empty((_world_size() * len(x), *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        # Every rank's loss saw every rank's rows: sum their gradients, keep this rank's slice.
        # (all_reduce rather than reduce_scatter, which gloo lacks.)
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad.chunk(_world_size())[dist.get_rank()]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate `x` from every rank along dim 0; gradients flow back to each rank's slice."""
    return _GatherWithGrad.apply(x) if _world_size() > 1 else x


def gather_no_grad(x: Tensor) -> Tensor:
    if _world_size() == 1:
        return x
    out = x.new_empty((_world_size() * len(x), *x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous())
    return out


def contrastive_similarities(
    image_feat: Tensor, text_feat: Tensor, image_ids: Tensor, temperature: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Local rows against the global batch: sim_i2t, sim_t2i [B_local, B_global] (divided by the
    temperature) and `positives` [B_local, B_global], True where both sides show the same image."""
    sim_i2t = image_feat @ gather_with_grad(text_feat).T / temperature
    sim_t2i = text_feat @ gather_with_grad(image_feat).T / temperature
    positives = image_ids[:, None] == gather_no_grad(image_ids)[None, :]
    return sim_i2t, sim_t2i, positives


def itc_loss(sim_i2t: Tensor, sim_t2i: Tensor, positives: Tensor) -> Tensor:
    """Image-text contrastive loss: symmetric InfoNCE, target mass spread evenly over all positives."""
    targets = positives.float() / positives.sum(dim=1, keepdim=True)
    loss_i2t = -(F.log_softmax(sim_i2t.float(), dim=1) * targets).sum(dim=1).mean()
    loss_t2i = -(F.log_softmax(sim_t2i.float(), dim=1) * targets).sum(dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


@torch.no_grad()
def sample_itm_negatives(sim_i2t: Tensor, sim_t2i: Tensor, positives: Tensor) -> tuple[Tensor, Tensor]:
    """Hard negatives for ITM: for each local image a global text, for each local text a global image,
    drawn in proportion to softmax similarity over every pair with a different image id.

    One multinomial call for both directions, no host sync. A row whose global batch shows only its own
    image has no negative to offer and falls back to a uniform draw. Non-finite similarities (a NaN batch
    on any rank) count as 0, so sampling still works; the step's loss is non-finite and DeepSpeed skips it.
    """
    both = torch.cat([positives, positives])
    excluded = both & ~both.all(dim=1, keepdim=True)
    similarities = torch.cat([sim_i2t, sim_t2i]).float().nan_to_num(0.0)
    weights = similarities.masked_fill(excluded, float("-inf")).softmax(dim=1)
    negative_texts, negative_images = torch.multinomial(weights, 1).squeeze(1).chunk(2)
    return negative_texts, negative_images


def itm_loss(itm_logits: Tensor, itm_labels: Tensor) -> Tensor:
    """Image-text matching loss: 2-way cross-entropy (1 = matched pair) on the fused [CLS]."""
    return F.cross_entropy(itm_logits.float(), itm_labels)


def mlm_loss(mlm_logits: Tensor, mlm_labels: Tensor) -> Tensor:
    """Masked language modelling loss over the positions whose label is not -100 (0 when none is)."""
    labels = mlm_labels.flatten()
    total = F.cross_entropy(mlm_logits.flatten(0, -2).float(), labels, ignore_index=-100, reduction="sum")
    return total / labels.ne(-100).sum().clamp(min=1)
