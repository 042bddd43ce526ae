"""Instruction-tuning recipes: the pretraining recipe's run sections plus `base`, `lm` and `stage`."""

from __future__ import annotations

from dataclasses import dataclass, field

from pretrain.train.recipe import DataSection, EvalSection, RunRecipe, _help, run_name


@dataclass
class BaseSection:
    path: str = _help("what the model starts from: a pretraining export (encoder; new projector, lm.name's LM) "
                      "or a stage-1 result (<run>/export: encoder, projector and LM)", "runs/tiny-synthetic/export")


@dataclass
class LMSection:
    """A stage-1 result as base keeps its projector: image_tokens, projector and fuse_question must be its own."""

    name: str = _help("causal LM: Hugging Face name or local directory (with a pretraining export as base)",
                      "runs/caption-lm/export")
    image_tokens: int = _help("image tokens in the LM's input (0: every encoder token state; mlp: N pooled, a "
                              "square; resampler: N learned queries)", 16)
    projector: str = _help("mlp | resampler", "mlp")
    fuse_question: bool = _help("one more image token: the first instruction read by the base's text encoder and "
                                "fused with the image by its fusion encoder (InstructBLIP's instruction-aware "
                                "visual input); those encoders train with stage.train_encoder", False)


@dataclass
class StageSection:
    name: str = _help("align (projectors only, encoders and LM frozen) | instruct (projectors + LM)", "align")
    lm_training: str = _help("instruct: full | lora (HF peft adapters on the LM)", "full")
    train_encoder: bool = _help("instruct: train the image encoder too (and lm.fuse_question's text and fusion "
                                "encoders)", False)
    encoder_lr_scale: float = _help("instruct with train_encoder: the encoders' learning rate as a fraction of "
                                    "optim.lr (pretrained features move gently while the LM learns to read them)",
                                    1.0)
    loss_per: str = _help("token: the loss is the mean over the batch's answer tokens (a caption outweighs a "
                          "one-word answer) | conversation: the mean of each conversation's mean", "token")
    lora_rank: int = _help("lora: rank r", 8)
    lora_alpha: int = _help("lora: scale alpha (update (alpha / r) B A)", 16)


@dataclass
class InstructDataSection(DataSection):
    train: str = _help("instruction shards (python -m data_pipeline.make_instructions)",
                       "data/shards/synthetic_instruct/train")
    val: str | None = _help("held-out instruction shards: captioning and VQA metrics at evaluation (None: none)",
                            "data/shards/synthetic_instruct/val")
    tokenizer: str | None = _help("the caption tokenizer the shared loader needs (None: the base export's "
                                  "tokenizer/); the LM's own tokenizer renders the conversations", None)
    max_len: int = _help("conversation length in LM tokens, image tokens included (longer ones are skipped)", 96)
    mlm_probability: float = _help("unused here (the shared loader's MLM copy of the caption)", 0.0)


@dataclass
class InstructEvalSection(EvalSection):
    samples: int = _help("held-out samples of each task (captioning, VQA) answered at each evaluation (0: all)", 64)
    max_new_tokens: int = _help("longest answer generated at evaluation (greedy)", 48)


@dataclass
class InstructRecipe(RunRecipe):
    name: str = run_name("instruct")
    base: BaseSection = field(default_factory=BaseSection)
    lm: LMSection = field(default_factory=LMSection)
    stage: StageSection = field(default_factory=StageSection)
    data: InstructDataSection = field(default_factory=InstructDataSection)
    eval: InstructEvalSection = field(default_factory=InstructEvalSection)
