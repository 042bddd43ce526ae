"""AdamW with ALBEF's decay rules and a linear-warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from pretrain.train.recipe import OptimSection, ScheduleSection


def _no_decay(param: nn.Parameter) -> bool:
    # Norm weights, biases and the ITC temperature (all 1-D) are scales/offsets, not features: decaying
    # them only pulls them toward zero (a temperature of 0 would make ITC logits explode). ZeRO-3
    # partitions flatten parameters, so the original shape is read from ds_shape.
    return len(getattr(param, "ds_shape", param.shape)) <= 1


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decayed and undecayed trainable parameters; a parameter with an `lr_scale` attribute (set by the model,
    e.g. pretrained encoders fine-tuned gently) goes in groups of its own with that `lr_scale`, after the
    unscaled groups (whose rate the log shows)."""
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {(1.0, False): [], (1.0, True): []}
    for param in model.parameters():
        if param.requires_grad:
            groups.setdefault((getattr(param, "lr_scale", 1.0), _no_decay(param)), []).append(param)
    return [{"params": params, "weight_decay": 0.0 if no_decay else weight_decay, "lr_scale": scale}
            for (scale, no_decay), params in groups.items()]


def build_optimizer(model: nn.Module, optim: OptimSection, offload_to_cpu: bool) -> torch.optim.Optimizer:
    groups = parameter_groups(model, optim.weight_decay)
    for group in groups:
        group["lr"] = optim.lr * group["lr_scale"]  # LambdaLR then scales each group's own peak
    if offload_to_cpu:
        # ZeRO-Offload steps the optimizer on the CPU; DeepSpeed's vectorised CPU Adam is made for that.
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps,
                             fused=torch.cuda.is_available())


def warmup_cosine(schedule: ScheduleSection, min_lr_ratio: float):
    """Multiplier on the peak lr: linear from ~0 to 1 over warmup, then cosine down to min_lr_ratio."""

    def factor(step: int) -> float:
        if step < schedule.warmup_steps:
            return (step + 1) / schedule.warmup_steps
        span = max(1, schedule.max_steps - schedule.warmup_steps)
        progress = min(1.0, (step - schedule.warmup_steps) / span)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: ScheduleSection, optim: OptimSection):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(schedule, optim.min_lr_ratio))
