"""Caption-LM recipes: the pretraining recipe's run sections plus `lm` (the architecture and its tokenizer)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pretrain.train.recipe import DataSection, EvalSection, RunRecipe, _help, run_name


@dataclass
class LMArchSection:
    tokenizer: str = _help("the LM's byte-level BPE tokenizer (python -m data_pipeline.lm_tokenizer)",
                           "data/caption-lm-tokenizer")
    hidden: int = _help("LM width", 128)
    layers: int = _help("decoder layers", 2)
    heads: int = _help("attention heads", 4)
    context: int = _help("max_position_embeddings", 256)


@dataclass
class CaptionLMDataSection(DataSection):
    val: str | None = _help("held-out caption shards: next-token loss at evaluation (None: none)",
                            "data/shards/synthetic/val")
    max_len: int = _help("LM tokens per sample: an image's captions, each <s>caption</s>, as many as fit", 256)
    mlm_probability: float = _help("unused here (the shared loader's MLM copy of the caption)", 0.0)
    crop_scale: tuple[float, float] = _help("unused here (the loader's pixels are not read)", (1.0, 1.0))
    hflip: bool = _help("unused here", False)
    randaugment: tuple[int, int] = _help("unused here", (0, 7))


@dataclass
class CaptionLMEvalSection(EvalSection):
    samples: int = _help("held-out images whose captions the evaluation loss covers", 256)


@dataclass
class CaptionLMRecipe(RunRecipe):
    name: str = run_name("caption-lm")
    lm: LMArchSection = field(default_factory=LMArchSection)
    data: CaptionLMDataSection = field(default_factory=CaptionLMDataSection)
    eval: CaptionLMEvalSection = field(default_factory=CaptionLMEvalSection)
