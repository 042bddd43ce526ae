"""ALBEF: ViT image encoder, BERT text encoder, cross-attention fusion encoder; ITC + ITM + MLM.

One forward runs every module the same number of times on every rank (ZeRO-3 requires it): the ViT
once, the text encoder once on clean + masked text together, the fusion encoder twice (the image's
own streams [positive, hard-negative text, masked text], then the hard-negative images).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.losses import (
    contrastive_similarities,
    gather_no_grad,
    gather_with_grad,
    itc_loss,
    itm_loss,
    mlm_loss,
    sample_itm_negatives,
)

from .attention import check_backend
from .bert import FusionEncoder, TextEncoder, stack_streams
from .config import ModelConfig
from .heads import MLMHead
from .padding import KeyPadding
from .vit import VisionTransformer


class ALBEFOutput(NamedTuple):
    """A NamedTuple, not a dataclass: ZeRO-3 finds the output tensors in it and fires its backward hooks."""

    loss: Tensor
    loss_itc: Tensor
    loss_itm: Tensor
    loss_mlm: Tensor
    itm_accuracy: Tensor
    temperature: Tensor
    itc_positive_sim: Tensor  # mean cosine similarity of matching pairs
    itc_negative_sim: Tensor  # mean cosine similarity of the other pairs in the global batch


class ALBEF(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        backend = check_backend(config.attention)
        self.image_encoder = VisionTransformer(config, backend)
        self.text_encoder = TextEncoder(config, backend)
        self.fusion_encoder = FusionEncoder(config, backend)
        self.vision_proj = nn.Linear(config.vision_hidden, config.embed_dim)
        self.text_proj = nn.Linear(config.text_hidden, config.embed_dim)
        self.itm_head = nn.Linear(config.text_hidden, 2)
        self.mlm_head = MLMHead(config, self.text_encoder.embeddings.word_embeddings)
        self.temp = nn.Parameter(torch.full([1], config.temperature_init))  # shape [1]: ZeRO-3 needs it
        self.apply(self.init_weights)

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
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        if isinstance(module, VisionTransformer):
            nn.init.trunc_normal_(module.cls_token, std=std)
            nn.init.trunc_normal_(module.pos_embed, std=std)
        if module is self:
            nn.init.constant_(self.temp, self.config.temperature_init)

    def encode_image(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        """Image token states [B, N, D_v] and the L2-normalised ITC feature [B, E]."""
        image_embeds = self.image_encoder(pixel_values)
        return image_embeds, F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Text token states [B, L, D_t] and the L2-normalised ITC feature [B, E]."""
        text_embeds = self.text_encoder(input_ids, KeyPadding(attention_mask.bool()))
        return text_embeds, F.normalize(self.text_proj(text_embeds[:, 0]), dim=-1)

    def itm_logits(self, image_embeds: Tensor, text_embeds: Tensor, attention_mask: Tensor) -> Tensor:
        """ITM logits [T, 2] (index 1 = match) for images [M, N, D_v] and texts [T, L, D_t], T a multiple
        of M, text t paired with image t // (T // M): re-ranking k texts against one image needs no copies."""
        fused = self.fusion_encoder(text_embeds, KeyPadding(attention_mask.bool()), image_embeds)
        return self.itm_head(fused[:, 0])

    def temperature(self) -> Tensor:
        # Clamped functionally: under mixed-precision engines the optimizer owns the master weights,
        # so clamping the module's copy in place would not stick.
        return self.temp.clamp(self.config.temperature_min, self.config.temperature_max)

    def forward(self, batch: dict) -> ALBEFOutput:
        mask = batch["attention_mask"]
        image_embeds, image_feat = self.encode_image(batch["pixel_values"])
        both = self.text_encoder(
            torch.cat([batch["input_ids"], batch["mlm_input_ids"]]), KeyPadding(torch.cat([mask, mask]).bool())
        )
        text_embeds, masked_text_embeds = both.chunk(2)
        text_feat = F.normalize(self.text_proj(text_embeds[:, 0]), dim=-1)

        temperature = self.temperature()
        sim_i2t, sim_t2i, positives = contrastive_similarities(image_feat, text_feat, batch["image_ids"], temperature)
        loss_itc = itc_loss(sim_i2t, sim_t2i, positives)

        # Fusion pass 1: each image with its caption, a hard-negative caption and its masked caption.
        negative_texts, negative_images = sample_itm_negatives(sim_i2t, sim_t2i, positives)
        negative_text_embeds = gather_with_grad(text_embeds)[negative_texts]
        negative_mask = gather_no_grad(mask)[negative_texts]
        streams = stack_streams(text_embeds, negative_text_embeds, masked_text_embeds)
        stream_padding = KeyPadding(stack_streams(mask, negative_mask, mask).bool())
        fused = self.fusion_encoder(streams, stream_padding, image_embeds).unflatten(0, (len(mask), 3))
        # Fusion pass 2: each caption with a hard-negative image.
        negative_image_embeds = gather_with_grad(image_embeds)[negative_images]
        fused_negative_images = self.fusion_encoder(text_embeds, KeyPadding(mask.bool()), negative_image_embeds)

        itm_cls = torch.cat([fused[:, 0, 0], fused[:, 1, 0], fused_negative_images[:, 0]])
        itm_labels = torch.zeros(len(itm_cls), dtype=torch.long, device=itm_cls.device)
        itm_labels[: len(mask)] = 1
        itm_logits = self.itm_head(itm_cls)
        loss_itm = itm_loss(itm_logits, itm_labels)

        mlm_labels = batch["mlm_labels"]
        masked = mlm_labels != -100
        loss_mlm = mlm_loss(self.mlm_head(fused[:, 2][masked]), mlm_labels[masked])

        c = self.config
        with torch.no_grad():
            cosine = sim_i2t.float() * temperature.float()
            positive_sim = (cosine * positives).sum() / positives.sum()
            negative_sim = (cosine * ~positives).sum() / (~positives).sum().clamp(min=1)
            itm_accuracy = (itm_logits.argmax(dim=1) == itm_labels).float().mean()
        return ALBEFOutput(
            loss=c.weight_itc * loss_itc + c.weight_itm * loss_itm + c.weight_mlm * loss_mlm,
            loss_itc=loss_itc,
            loss_itm=loss_itm,
            loss_mlm=loss_mlm,
            itm_accuracy=itm_accuracy,
            temperature=temperature.detach().squeeze(),
            itc_positive_sim=positive_sim,
            itc_negative_sim=negative_sim,
        )
