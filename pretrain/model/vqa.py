"""VQA as answer classification (as ViLT / METER on VQA v2): the fusion encoder's [CLS] for the question
and the image, an MLP over the most frequent answers, binary cross-entropy against VQA's soft scores.

The ALBEF inside is the pretrained model, whole, so an export loads into it by its own names; its ITC/ITM/MLM
heads are not used here (and stay frozen).
"""

from __future__ import annotations

from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn

from .albef import ALBEF
from .config import ModelConfig
from .objectives import at_least_fp32
from .padding import KeyPadding


class VQAOutput(NamedTuple):
    loss: Tensor
    vqa_score: Tensor  # mean soft score of the predicted answers (no gradient)


def vqa_loss(logits: Tensor, answer_scores: Tensor) -> Tensor:
    """Binary cross-entropy per answer against the soft scores, summed over answers, mean over questions (the
    loss ViLT and BUTD use: several answers may be partly right)."""
    logits = at_least_fp32(logits)
    per_answer = F.binary_cross_entropy_with_logits(logits, answer_scores.to(logits.dtype), reduction="none")
    return per_answer.sum(dim=1).mean()


def predicted_scores(logits: Tensor, answer_scores: Tensor) -> Tensor:
    """[B] the soft score of each question's top answer: VQA accuracy per question."""
    return answer_scores.gather(1, logits.argmax(dim=1, keepdim=True)).squeeze(1).float()


class ALBEFForVQA(nn.Module):
    # parameters trained by every fine-tuning method (a new head has nothing pretrained to keep)
    TASK_HEAD = ("answer_head.",)
    # the pretrained parts the task runs: full fine-tuning trains these and the head
    USED = ("albef.image_encoder.", "albef.text_encoder.", "albef.fusion_encoder.")

    def __init__(self, config: ModelConfig, num_answers: int):
        super().__init__()
        self.config = config
        self.albef = ALBEF(config)
        hidden = config.text_hidden
        self.answer_head = nn.Sequential(
            nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.LayerNorm(2 * hidden, eps=config.text_layer_norm_eps),
            nn.Linear(2 * hidden, num_answers),
        )
        self.apply(self.init_weights)

    def init_weights(self, module: nn.Module) -> None:
        self.albef.init_weights(module)  # its rules cover the head's Linear and LayerNorm layers

    def answer_logits(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        image_embeds = self.albef.image_encoder(pixel_values)
        padding = KeyPadding(attention_mask.bool())
        text_embeds = self.albef.text_encoder(input_ids, padding)
        fused = self.albef.fusion_encoder(text_embeds, padding, image_embeds)
        return self.answer_head(fused[:, 0])

    def forward(self, batch: dict) -> VQAOutput:
        logits = self.answer_logits(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        scores = batch["answer_scores"]
        return VQAOutput(vqa_loss(logits, scores), predicted_scores(logits.detach(), scores).mean())
