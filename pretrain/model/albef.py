"""ALBEF: ViT image encoder, BERT text encoder, cross- or co-attention fusion encoder; ITC + ITM + MLM,
optionally with momentum distillation (momentum.py).

One forward runs every module the same number of times on every rank (ZeRO-3 requires it): the ViT
once, the text encoder once on clean + masked text together (+ the word-swapped captions when the batch has
them: extra ITC negatives), the fusion encoder twice (the image's own streams, then each caption with a
hard-negative image); with momentum distillation the teacher once.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.distributed import fetch_rows

from .attention import check_backend
from .bert import TextEncoder, stack_streams
from .config import ModelConfig
from .fusion import build_fusion_encoder
from .heads import MLMHead
from .momentum import MomentumTeacher, Teacher
from .objectives import (
    HardNegatives,
    ITCResult,
    QueuedFeatures,
    at_least_fp32,
    caption_words_loss,
    itc_distill_loss,
    itc_loss,
    itm_loss,
    mlm_loss,
    sample_itm_negatives,
)
from .padding import KeyPadding
from .vit import VisionTransformer


class ALBEFOutput(NamedTuple):
    """A NamedTuple, not a dataclass: ZeRO-3 finds the output tensors in it and fires its backward hooks."""

    loss: Tensor
    loss_itc: Tensor
    loss_itm: Tensor
    loss_mlm: Tensor
    loss_words: Tensor  # caption-word classification (0 unless config.weight_words)
    itm_accuracy: Tensor
    mlm_accuracy: Tensor  # fraction of this rank's masked tokens predicted right
    temperature: Tensor
    itc_positive_sim: Tensor  # mean cosine similarity of matching pairs
    itc_negative_sim: Tensor  # mean cosine similarity of the other pairs in the global batch


class ImageStreams(NamedTuple):
    """The text streams the first fusion pass runs against each image, in this order."""

    positive: Tensor  # the image's own caption
    negative_text: Tensor  # a hard-negative caption (another image's)
    masked_text: Tensor  # the image's own caption with MLM masking


class _ClampBackInside(torch.autograd.Function):
    """clamp(x, low, high) whose gradient survives outside the bounds when it points back inside them.

    A plain clamp has zero gradient outside [low, high], so a parameter that crossed a bound could never
    return; this one only blocks the gradient that would push it further out (descent moves against it).
    """

    @staticmethod
    def forward(ctx, x: Tensor, low: float, high: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.low, ctx.high = low, high
        return x.clamp(low, high)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        outward = ((x < ctx.low) & (grad > 0)) | ((x > ctx.high) & (grad < 0))
        return grad.masked_fill(outward, 0.0), None, None


class ALBEF(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        backend = check_backend(config.attention)
        self.image_encoder = VisionTransformer(config, backend)
        self.text_encoder = TextEncoder(config, backend)
        self.fusion_encoder = build_fusion_encoder(config, backend)
        self.vision_proj = nn.Linear(config.vision_hidden, config.embed_dim)
        self.text_proj = nn.Linear(config.text_hidden, config.embed_dim)
        self.itm_head = nn.Linear(config.text_hidden, 2)
        self.mlm_head = MLMHead(config, self.text_encoder.embeddings.word_embeddings)
        if config.weight_words:  # absent otherwise: ALBEF's parameters and exports stay as they are
            self.words_head = nn.Linear(config.vision_hidden, config.vocab_size)
        self.temp = nn.Parameter(torch.full([1], config.temperature_init))  # shape [1]: ZeRO-3 needs it
        self.momentum = MomentumTeacher(config, backend) if config.momentum_distillation else None
        self.apply(self.init_weights)
        self.start_momentum_teacher()

    def init_weights(self, module: nn.Module) -> None:
        """Initialise `module`'s own parameters (not its children's).

        Under ZeRO-3 every submodule is partitioned as soon as it is built, so the `apply` above only
        sees empty shards; the trainer calls this again per module with that module's parameters gathered.
        """
        std = self.config.init_std
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        if isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        if isinstance(module, VisionTransformer):
            nn.init.trunc_normal_(module.cls_token, std=std)
            nn.init.trunc_normal_(module.pos_embed, std=std)
        if module is self:
            nn.init.constant_(self.temp, self.config.temperature_init)

    def start_momentum_teacher(self) -> None:
        """Make the teacher a copy of the online model; the trainer calls it again once the weights are final
        (under ZeRO-3 they are initialised and loaded after construction)."""
        if self.momentum is not None:
            self.momentum.copy_from(self)

    def encode_image(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        """Image token states [B, N, D_v] and the L2-normalised fp32 ITC feature [B, E]."""
        image_embeds = self.image_encoder(pixel_values)
        return image_embeds, F.normalize(at_least_fp32(self.vision_proj(image_embeds[:, 0])), dim=-1)

    @staticmethod
    def words_input(image_embeds: Tensor) -> Tensor:
        """What the caption-word head reads: the mean patch state [B, D_v]. Every patch then has to hold what it
        shows, which instruction tuning's pooled patch tokens read; from [CLS] only [CLS] learned it
        (docs/alignment.md, Round 8)."""
        return image_embeds[:, 1:].mean(dim=1)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Text token states [B, L, D_t] and the L2-normalised fp32 ITC feature [B, E]."""
        text_embeds = self.text_encoder(input_ids, KeyPadding(attention_mask.bool()))
        return text_embeds, self.text_feature(text_embeds)

    def text_feature(self, text_embeds: Tensor) -> Tensor:
        return F.normalize(at_least_fp32(self.text_proj(text_embeds[:, 0])), dim=-1)

    def itm_logits(self, image_embeds: Tensor, text_embeds: Tensor, attention_mask: Tensor) -> Tensor:
        """ITM logits [T, 2] (index 1 = match) for images [M, N, D_v] and texts [T, L, D_t], T a multiple
        of M, text t paired with image t // (T // M): re-ranking k texts against one image needs no copies."""
        fused = self.fusion_encoder(text_embeds, KeyPadding(attention_mask.bool()), image_embeds)
        return self.itm_head(fused[:, 0])

    def temperature(self) -> Tensor:
        # Clamped functionally (under mixed-precision engines the optimizer owns the master weights, so an
        # in-place clamp of the module's copy would not stick), with a gradient that can bring it back.
        return _ClampBackInside.apply(self.temp, self.config.temperature_min, self.config.temperature_max)

    def contrast(self, image_feat: Tensor, text_feat: Tensor, image_ids: Tensor, temperature: Tensor,
                 teacher: Teacher | None, hard_negatives: HardNegatives | None = None) -> ITCResult:
        """ITC over the global batch and its hard-negative captions: plain, or distilled from the teacher against
        its batch and queued keys."""
        if teacher is None:
            return itc_loss(image_feat, text_feat, image_ids, temperature, hard_negatives)
        queue = self.momentum.queue
        queued = QueuedFeatures(queue.image_feat, queue.text_feat, queue.image_ids)
        return itc_distill_loss(image_feat, text_feat, image_ids, temperature, teacher.image_feat, teacher.text_feat,
                                queued, teacher.alpha, hard_negatives)

    def masked_lm(self, masked_text: Tensor, mlm_labels: Tensor, teacher: Teacher | None) -> tuple[Tensor, Tensor]:
        """MLM loss and masked-token accuracy, the targets mixed with the teacher's distribution if there is one."""
        if teacher is None:
            return mlm_loss(self.mlm_head, masked_text, mlm_labels)
        return mlm_loss(self.mlm_head, masked_text, mlm_labels, teacher.mlm_probs, teacher.alpha)

    def forward(self, batch: dict) -> ALBEFOutput:
        mask = batch["attention_mask"]
        image_embeds, image_feat = self.encode_image(batch["pixel_values"])
        # one text encoder pass: clean and masked captions, and the hard-negative ones if the batch has them
        swap = "swap_input_ids" in batch
        texts = [batch["input_ids"], batch["mlm_input_ids"]] + ([batch["swap_input_ids"]] if swap else [])
        masks = [mask, mask] + ([batch["swap_attention_mask"]] if swap else [])
        all_text = self.text_encoder(torch.cat(texts), KeyPadding(torch.cat(masks).bool()))
        text_embeds, masked_text_embeds, *swapped_embeds = all_text.chunk(len(texts))
        hard_negatives = HardNegatives(self.text_feature(swapped_embeds[0]), batch["swap_valid"]) if swap else None
        temperature = self.temperature()
        teacher = self.momentum(batch) if self.momentum is not None else None
        itc = self.contrast(image_feat, self.text_feature(text_embeds), batch["image_ids"], temperature, teacher,
                            hard_negatives)

        negative_texts, negative_images = sample_itm_negatives(itc, self.config.itm_negative_hardness)
        # Fusion pass 1: each image with its caption, a hard-negative caption and its masked caption.
        streams = ImageStreams(text_embeds, fetch_rows(text_embeds, negative_texts), masked_text_embeds)
        padding = ImageStreams(mask, fetch_rows(mask, negative_texts), mask)
        fused = self.fusion_encoder(stack_streams(*streams), KeyPadding(stack_streams(*padding).bool()), image_embeds)
        fused = ImageStreams(*fused.unflatten(0, (len(mask), len(streams))).unbind(1))
        # Fusion pass 2: each caption with a hard-negative image.
        negative_image_embeds = fetch_rows(image_embeds, negative_images)
        fused_negative_image = self.fusion_encoder(text_embeds, KeyPadding(mask.bool()), negative_image_embeds)

        loss_itm, itm_accuracy = itm_loss(self.itm_head, fused.positive, fused.negative_text, fused_negative_image)
        loss_mlm, mlm_accuracy = self.masked_lm(fused.masked_text, batch["mlm_labels"], teacher)
        if self.momentum is not None and self.training:
            self.momentum.update(self, teacher, batch["image_ids"])  # queue the batch, one EMA step
        c = self.config
        loss_words = torch.zeros_like(loss_mlm)
        if c.weight_words:
            loss_words = caption_words_loss(self.words_head(self.words_input(image_embeds)), batch["input_ids"], mask)
        return ALBEFOutput(
            loss=(c.weight_itc * itc.loss + c.weight_itm * loss_itm + c.weight_mlm * loss_mlm
                  + c.weight_words * loss_words),
            loss_itc=itc.loss,
            loss_itm=loss_itm,
            loss_mlm=loss_mlm,
            loss_words=loss_words,
            itm_accuracy=itm_accuracy,
            mlm_accuracy=mlm_accuracy,
            temperature=temperature.detach().squeeze(),
            itc_positive_sim=itc.positive_sim,
            itc_negative_sim=itc.negative_sim,
        )
