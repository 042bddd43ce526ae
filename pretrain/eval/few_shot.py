"""Few-shot classifiers on a frozen model: learned context (CoOp), learned label embeddings, a linear probe.

The encoders never change: images are encoded once per set (their features are cached by the caller) and
only the prompt parameters train, full-batch on the k x C shots, with cross-entropy over the class logits
(cosine similarity / the model's ITC temperature). A handful of parameters and one process: plain torch
AdamW under the project's warmup-cosine schedule, no engine.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.eval.classification import label_word_ids
from pretrain.model import ALBEF
from pretrain.model.prompting import LearnedContext, class_embeddings
from pretrain.train.optim import warmup_cosine
from pretrain.train.recipe import ScheduleSection


def logit_scale(model: ALBEF) -> float:
    """The scale the model's ITC trained with: 1 / temperature."""
    return 1.0 / float(model.temperature().detach())


def fit(params: list[Tensor], loss_of: Callable[[], Tensor], steps: int, lr: float,
        weight_decay: float = 0.0) -> list[float]:
    """AdamW on `params` for `steps` full-batch steps, warmup then cosine (the pretraining schedule's shape);
    returns the loss before each step."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = ScheduleSection(max_steps=steps, warmup_steps=max(1, steps // 20))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(schedule, min_lr_ratio=0.01))
    losses = []
    for _ in range(steps):
        loss = loss_of()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses


class ContextClassifier:
    """Class embeddings from learned context before each label word of each class."""

    def __init__(self, model: ALBEF, tokenizer, context: LearnedContext, verbalizer: dict[str, list[str]],
                 classes: list[str], max_len: int):
        self.model, self.context, self.num_classes = model, context, len(classes)
        words = [word for name in classes for word in verbalizer[name]]
        self.owner = torch.tensor([label for label, name in enumerate(classes) for _ in verbalizer[name]])
        self.input_ids, self.mask = label_word_ids(tokenizer, words, max_len, context.length)

    def class_embeddings(self) -> Tensor:
        _, feats = self.context.encode(self.model, self.input_ids, self.mask, self.owner)
        return class_embeddings(feats, self.owner, self.num_classes)


def train_context(classifier: ContextClassifier, feats: Tensor, labels: Tensor, scale: float, steps: int,
                  lr: float, anchor: Tensor | None = None, anchor_weight: float = 0.0) -> list[float]:
    """Cross-entropy over the class logits; with `anchor` (the hand prompts' class embeddings [C, E]) plus
    `anchor_weight` times the class embeddings' mean squared distance from it (KgCoOp, Yao et al. 2023), so
    that the context moves from the hand prompts only as far as the shots pay for."""

    def loss() -> Tensor:
        classes = classifier.class_embeddings()
        value = F.cross_entropy(scale * feats @ classes.T, labels)
        if anchor is not None and anchor_weight:
            value = value + anchor_weight * (classes - anchor).square().sum(dim=-1).mean()
        return value

    return fit(list(classifier.context.parameters()), loss, steps, lr)


def train_label_embeddings(init: Tensor, feats: Tensor, labels: Tensor, scale: float, steps: int,
                           lr: float) -> tuple[Tensor, list[float]]:
    """Class embeddings [C, E] initialised from `init` (the hand prompts' ensemble) and tuned directly."""
    embeddings = nn.Parameter(init.detach().clone())
    losses = fit([embeddings], lambda: F.cross_entropy(scale * feats @ F.normalize(embeddings, dim=-1).T, labels),
                 steps, lr)
    return F.normalize(embeddings.detach(), dim=-1), losses


def linear_probe(feats: Tensor, labels: Tensor, num_classes: int, l2: float) -> Callable[[Tensor], Tensor]:
    """Multinomial logistic regression on the image features (L-BFGS, L2 penalty `l2` on the weights);
    returns the logits function."""
    weight = torch.zeros(feats.shape[1], num_classes, requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(feats @ weight + bias, labels) + l2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    weight, bias = weight.detach(), bias.detach()
    return lambda x: x @ weight + bias


def top1(logits: Tensor, labels: Tensor) -> float:
    return (logits.argmax(dim=1) == labels).double().mean().item()
