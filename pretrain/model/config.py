"""Model configuration and the named presets (tiny / base / large)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

ATTENTION_BACKENDS = ("auto", "flash_attn", "sdpa", "eager")
FUSIONS = ("cross_attention", "co_attention")
PATCH_STEMS = ("linear", "conv")


class ModelConfigError(ValueError):
    """A model configuration a user asked for cannot be built."""


@dataclass
class ModelConfig:
    # image encoder (ViT, pre-norm)
    image_size: int = 224
    patch_size: int = 16
    vision_hidden: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vision_mlp: int = 3072
    vision_layer_norm_eps: float = 1e-12
    # patch embedding: "linear" (ViT's one strided conv) or "conv" (ViT_C, Xiao et al. 2021: log2(patch_size)
    # 3x3 stride-2 convs with GroupNorm and GELU, then a 1x1 conv; learns shapes from scratch far faster)
    patch_stem: str = "linear"
    # text encoder and fusion encoder (BERT, post-norm); fusion layers add cross-attention to the image
    vocab_size: int = 30522
    text_hidden: int = 768
    text_layers: int = 6
    fusion_layers: int = 6
    text_heads: int = 12
    text_intermediate: int = 3072
    max_position: int = 512
    type_vocab_size: int = 2
    text_layer_norm_eps: float = 1e-12
    dropout: float = 0.0  # BERT's hidden and attention dropout in the text and fusion encoders (BERT: 0.1)
    # fusion: cross_attention (ALBEF: text attends to the image) or co_attention (ViLBERT: two streams,
    # text attends to the image and the image to the text in the same layer)
    fusion: str = "cross_attention"
    # heads and losses
    embed_dim: int = 256
    temperature_init: float = 0.07
    temperature_min: float = 0.001
    temperature_max: float = 0.5
    weight_itc: float = 1.0
    weight_itm: float = 1.0
    weight_mlm: float = 1.0
    # caption-word classification from the mean patch state (SuperClass; objectives.caption_words_loss); ALBEF: 0.
    # A direct signal for what the image must show: the from-scratch encoder of the embedded default learns
    # shape from it, which ITC, ITM and MLM alone do not teach it within its budget (docs/alignment.md)
    weight_words: float = 0.0
    # ITM's negatives are drawn by softmax(hardness * ITC logit): 1 as ALBEF (nearly always the hardest pair
    # once the temperature is low), 0 uniformly from the other images of the batch
    itm_negative_hardness: float = 1.0
    # momentum distillation (ALBEF): EMA teachers for ITC and MLM, and a queue of their ITC features
    momentum_distillation: bool = False
    momentum: float = 0.995  # EMA decay per optimizer update
    momentum_every: int = 1  # training forwards per update (gradient accumulation): one EMA step per update
    distill_alpha: float = 0.4  # weight of the teacher's distribution in the ITC and MLM targets
    distill_alpha_ramp_steps: int = 0  # training forwards over which alpha ramps up from 0 (ALBEF: one epoch; 0: none)
    queue_size: int = 0  # queued teacher features (ALBEF: 65,536); 0: the batch's own only
    # execution
    attention: str = "auto"
    grad_checkpointing: bool = False
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_BACKENDS:
            raise ModelConfigError(
                f"attention backend {self.attention!r} is unknown; use one of {', '.join(ATTENTION_BACKENDS)}"
            )
        if self.fusion not in FUSIONS:
            raise ModelConfigError(f"fusion {self.fusion!r} is unknown; use one of {', '.join(FUSIONS)}")
        if self.patch_stem not in PATCH_STEMS:
            raise ModelConfigError(f"patch_stem {self.patch_stem!r} is unknown; use one of {', '.join(PATCH_STEMS)}")
        if self.patch_stem == "conv" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            raise ModelConfigError(f"patch_stem conv halves the image per conv, so patch_size {self.patch_size} must "
                                   "be a power of 2 (at least 2); change patch_size or use patch_stem linear")
        if self.itm_negative_hardness < 0:
            raise ModelConfigError(f"itm_negative_hardness {self.itm_negative_hardness} is negative (it would draw the "
                                   "least similar pairs); use 0 (uniform) to 1 (ALBEF)")
        if self.queue_size and not self.momentum_distillation:
            raise ModelConfigError(f"queue_size {self.queue_size} needs momentum_distillation: the queue holds the "
                                   "momentum encoders' features; turn it on or set queue_size 0")
        if not (0 <= self.momentum < 1 and 0 <= self.distill_alpha <= 1 and self.queue_size >= 0
                and self.distill_alpha_ramp_steps >= 0 and self.momentum_every >= 1):
            raise ModelConfigError(f"momentum {self.momentum} must be in [0, 1), distill_alpha {self.distill_alpha} "
                                   f"in [0, 1], queue_size {self.queue_size} and distill_alpha_ramp_steps "
                                   f"{self.distill_alpha_ramp_steps} at least 0, momentum_every "
                                   f"{self.momentum_every} at least 1: fix the value")
        if self.image_size % self.patch_size:
            raise ModelConfigError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}; change one"
            )
        for hidden, heads, what in (
            (self.vision_hidden, self.vision_heads, "vision"),
            (self.text_hidden, self.text_heads, "text"),
        ):
            if hidden % heads:
                raise ModelConfigError(f"{what} hidden size {hidden} is not divisible by {heads} heads")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


_PRESETS: dict[str, dict] = {
    # Trains retrieval on synthetic shapes on 2 CPU cores within minutes, from scratch. Init std ~
    # 1/sqrt(hidden): at BERT's 0.02 a 128-wide post-norm [CLS] barely depends on the caption and ITC stalls.
    "tiny": dict(
        image_size=64, patch_size=8, vision_hidden=128, vision_layers=4, vision_heads=4, vision_mlp=512,
        text_hidden=128, text_layers=2, fusion_layers=2, text_heads=4, text_intermediate=512, max_position=32,
        init_std=0.08,
    ),
    # ALBEF's size: ViT-B/16 (at ALBEF's pretraining resolution 256) + BERT-base split 6 text / 6 fusion.
    "base": dict(image_size=256),
    # ViT-L/16 + BERT-large split 12 text / 12 fusion.
    "large": dict(
        image_size=224, vision_hidden=1024, vision_layers=24, vision_heads=16, vision_mlp=4096,
        text_hidden=1024, text_layers=12, fusion_layers=12, text_heads=16, text_intermediate=4096,
    ),
}  # fmt: skip


def model_preset(name: str, **overrides) -> ModelConfig:
    """The named preset with `overrides` applied, e.g. ``model_preset("tiny", vocab_size=1500)``."""
    if name not in _PRESETS:
        raise ModelConfigError(f"model preset {name!r} is unknown; use one of {', '.join(_PRESETS)}")
    valid = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ModelConfigError(
            f"unknown model config key(s) {', '.join(unknown)}; valid keys are {', '.join(sorted(valid))}"
        )
    return ModelConfig(**{**_PRESETS[name], **overrides})
