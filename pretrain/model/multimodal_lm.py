"""A multimodal causal LM in the LLaVA / BLIP-2 shape: our pretrained image encoder, a projector into the
LM's embedding space, and any Hugging Face `AutoModelForCausalLM`.

The text carries one `<image>` token per image embedding (the data side expands the placeholder to
`image_tokens` copies); `embed` puts the projected image states exactly there and the LM runs on
`inputs_embeds`, so training, beam search and sampling are the LM's own (`generate()`). With `fuse_question`
the last of them is the instruction fused with the image (question_fusion.py, InstructBLIP's idea), so every
call also takes the instruction in the pretraining tokenizer's ids (`question_inputs`).

A saved model is a directory: `lm/` (the LM and its tokenizer, save_pretrained), `encoder_config.json` +
`image_encoder.safetensors` (our ViT), `projector.safetensors` + `multimodal_config.json`; with `fuse_question`
also `question_fusion.safetensors` and `question_tokenizer/`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import Tensor, nn

from .albef import ALBEF
from .attention import check_backend
from .config import ModelConfig
from .question_fusion import QuestionFusion
from .vit import VisionTransformer

IMAGE_TOKEN = "<image>"
PROJECTORS = ("mlp", "resampler")
STAGES = ("align", "instruct")  # 1: the projector alone on captioning; 2: projector + LM (full or LoRA)
LM_TRAINING = ("full", "lora")
ENCODER_CONFIG, ENCODER_WEIGHTS = "encoder_config.json", "image_encoder.safetensors"
PROJECTOR_CONFIG, PROJECTOR_WEIGHTS = "multimodal_config.json", "projector.safetensors"
QUESTION_WEIGHTS, QUESTION_TOKENIZER = "question_fusion.safetensors", "question_tokenizer"
Question = tuple[Tensor, Tensor]  # the instruction's ids [B, L] in the pretraining tokenizer, and their mask


class MultimodalLMError(ValueError):
    """An image encoder, LM, tokenizer or input that does not fit the multimodal model."""


@dataclass
class ProjectorConfig:
    vision_hidden: int
    lm_hidden: int
    image_tokens: int = 0  # 0: every token state of the encoder ([CLS] + patches); N: N tokens per image
    kind: str = "mlp"  # mlp: N pooled patch states (N a square) | resampler: N learned queries attend to all states
    resampler_heads: int = 4
    fuse_question: bool = False  # one more token: the instruction fused with the image (question_fusion.py)

    def __post_init__(self) -> None:
        if self.kind not in PROJECTORS:
            raise MultimodalLMError(f"projector {self.kind!r} is unknown; use one of {', '.join(PROJECTORS)}")
        if self.kind == "resampler" and self.image_tokens < 1:
            raise MultimodalLMError("the resampler needs image_tokens >= 1 (its number of learned queries)")
        if self.kind == "mlp" and self.image_tokens and int(self.image_tokens**0.5) ** 2 != self.image_tokens:
            raise MultimodalLMError(f"image_tokens {self.image_tokens} pooled from the patch grid must be a square "
                                    "(1, 4, 9, 16, ...), or 0 for every token state")

    def tokens_per_image(self, encoder: ModelConfig) -> int:
        return (self.image_tokens or encoder.num_patches + 1) + self.fuse_question


class MLPProjector(nn.Module):
    """LLaVA-1.5's projector: Linear, GELU, Linear; optionally on the patch grid average-pooled to k x k."""

    def __init__(self, config: ProjectorConfig):
        super().__init__()
        self.side = int(config.image_tokens**0.5)
        self.fc1 = nn.Linear(config.vision_hidden, config.lm_hidden)
        self.fc2 = nn.Linear(config.lm_hidden, config.lm_hidden)

    def forward(self, states: Tensor) -> Tensor:
        if self.side:  # pool the patches (not [CLS]) on their 2D grid
            patches = states[:, 1:]
            grid = int(patches.shape[1] ** 0.5)
            patches = patches.transpose(1, 2).unflatten(2, (grid, grid))
            states = F.adaptive_avg_pool2d(patches, self.side).flatten(2).transpose(1, 2)
        return self.fc2(F.gelu(self.fc1(states)))


class QueryResampler(nn.Module):
    """A small Perceiver resampler (Flamingo / BLIP-2's Q-Former idea): N learned queries cross-attend to
    every encoder state once, then the MLP maps them to the LM's width."""

    def __init__(self, config: ProjectorConfig):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(config.image_tokens, config.vision_hidden) * 0.02)
        self.norm_queries = nn.LayerNorm(config.vision_hidden)
        self.norm_states = nn.LayerNorm(config.vision_hidden)
        self.attn = nn.MultiheadAttention(config.vision_hidden, config.resampler_heads, batch_first=True)
        self.mlp = MLPProjector(ProjectorConfig(config.vision_hidden, config.lm_hidden))

    def forward(self, states: Tensor) -> Tensor:
        queries = self.queries.expand(len(states), -1, -1)
        context = self.norm_states(states)
        attended, _ = self.attn(self.norm_queries(queries), context, context, need_weights=False)
        return self.mlp(queries + attended)


def build_projector(config: ProjectorConfig) -> nn.Module:
    return QueryResampler(config) if config.kind == "resampler" else MLPProjector(config)


class MultimodalLMOutput(NamedTuple):
    """Scalars for the training loop (a NamedTuple: ZeRO-3 finds the tensors in it)."""

    loss: Tensor
    token_accuracy: Tensor  # next-token accuracy on the labelled (assistant) tokens
    labelled_tokens: Tensor


def load_image_encoder(export_dir: str | Path) -> tuple[VisionTransformer, ModelConfig]:
    """Our ViT with its weights from a pretraining export (model_config.json + model.safetensors) or a saved
    multimodal model (encoder_config.json + image_encoder.safetensors)."""
    export_dir = Path(export_dir)
    layouts = [("model_config.json", "model.safetensors", "image_encoder."), (ENCODER_CONFIG, ENCODER_WEIGHTS, "")]
    found = [layout for layout in layouts if all((export_dir / name).is_file() for name in layout[:2])]
    if not found:
        raise MultimodalLMError(f"{export_dir} is not a pretraining export (model_config.json + model.safetensors): "
                                "pass a run's export/ directory")
    config_name, weights_name, prefix = found[0]
    config = ModelConfig(**json.loads((export_dir / config_name).read_text()))
    encoder = VisionTransformer(config, check_backend(config.attention))
    with safe_open(str(export_dir / weights_name), framework="pt") as weights:
        names = [k for k in weights.keys() if k.startswith(prefix)]  # noqa: SIM118 (safe_open is no mapping)
        state = {k[len(prefix):]: weights.get_tensor(k) for k in names}
    encoder.load_state_dict(state, strict=True)
    return encoder, config


def is_saved_multimodal(path: str | Path) -> bool:
    """A directory `MultimodalLM.save_pretrained` wrote (stage 2 starts from one), not a pretraining export."""
    return (Path(path) / PROJECTOR_CONFIG).is_file()


def load_question_tokenizer(base: str | Path, encoder: ModelConfig):
    """The pretraining tokenizer the fusion encoder reads the instruction with: a saved model's
    question_tokenizer/, or a pretraining export's tokenizer/."""
    from transformers import AutoTokenizer

    base = Path(base)
    folder = base / (QUESTION_TOKENIZER if is_saved_multimodal(base) else "tokenizer")
    if not folder.is_dir():
        raise MultimodalLMError(f"{base} has no {folder.name}/: fuse_question reads the instruction with the "
                                "pretraining tokenizer; use an export that holds it (make pretrain writes one)")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if len(tokenizer) > encoder.vocab_size:
        raise MultimodalLMError(f"{folder} has {len(tokenizer)} tokens but the text encoder embeds "
                                f"{encoder.vocab_size}: use the tokenizer the export was pretrained with")
    return tokenizer


def load_lm_tokenizer(name_or_dir: str):
    """The LM's tokenizer with `<image>` added as a special token (the LM never embeds it: `embed` replaces
    those positions) and a pad token (GPT-2 / Llama tokenizers have none; padding is masked anyway)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_dir)
    except (OSError, ValueError) as error:
        raise MultimodalLMError(f"cannot load the tokenizer of {name_or_dir!r}: {str(error).splitlines()[0]}") from None
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_configs(base: str | Path, lm_name_or_dir: str | None = None, image_tokens: int = 0, projector: str = "mlp",
                 fuse_question: bool = False):
    """(encoder ModelConfig, ProjectorConfig, LM config, LM tokenizer, question tokenizer or None) of the model
    `MultimodalLM.load` would give, read from config and tokenizer files only (no weights): what a partitioned
    (ZeRO-3) copy is built from."""
    from transformers import AutoConfig

    base = Path(base)
    saved = is_saved_multimodal(base)
    name = str(base / "lm") if saved else lm_name_or_dir
    encoder_file = base / (ENCODER_CONFIG if saved else "model_config.json")
    if not encoder_file.is_file():
        raise MultimodalLMError(f"{base} is neither a pretraining export (model_config.json + model.safetensors) "
                                "nor a saved multimodal model: pass a run's export/ directory")
    encoder_config = ModelConfig(**json.loads(encoder_file.read_text()))
    try:
        lm_config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise MultimodalLMError(f"cannot load causal LM {name!r}: {str(error).splitlines()[0]}") from None
    if saved:
        projector_config = ProjectorConfig(**json.loads((base / PROJECTOR_CONFIG).read_text()))
    else:
        projector_config = ProjectorConfig(encoder_config.vision_hidden, lm_config.get_text_config().hidden_size,
                                           image_tokens, projector, fuse_question=fuse_question)
    question_tokenizer = load_question_tokenizer(base, encoder_config) if projector_config.fuse_question else None
    return encoder_config, projector_config, lm_config, load_lm_tokenizer(name), question_tokenizer


def load_causal_lm(name_or_dir: str):
    """`AutoModelForCausalLM` and its tokenizer (`load_lm_tokenizer`) from a Hub name or a local directory."""
    from transformers import AutoModelForCausalLM

    try:
        lm = AutoModelForCausalLM.from_pretrained(name_or_dir)
    except (OSError, ValueError) as error:
        raise MultimodalLMError(f"cannot load causal LM {name_or_dir!r}: {str(error).splitlines()[0]}") from None
    return lm, load_lm_tokenizer(name_or_dir)


def check_lm_fits(lm, tokenizer, projector: ProjectorConfig) -> None:
    """The LM's width must be the projector's output and every token of the tokenizer but `<image>` must
    have an embedding row; anything else trains on garbage, so it is one error naming the mismatch."""
    hidden = lm.get_input_embeddings().embedding_dim
    if hidden != projector.lm_hidden:
        raise MultimodalLMError(f"the LM's hidden size is {hidden} but the projector maps to {projector.lm_hidden}: "
                                "use the LM this projector was trained with, or train a new projector (stage 1)")
    rows = lm.get_input_embeddings().num_embeddings
    text_ids = [i for t, i in tokenizer.get_vocab().items() if t != IMAGE_TOKEN]
    if max(text_ids) >= rows:
        raise MultimodalLMError(f"the tokenizer has ids up to {max(text_ids)} but the LM embeds only {rows} tokens: "
                                "use the tokenizer saved with this LM")


class MultimodalLM(nn.Module):
    def __init__(self, image_encoder: VisionTransformer, encoder_config: ModelConfig, projector: ProjectorConfig,
                 lm, tokenizer, question_tokenizer=None):
        super().__init__()
        check_lm_fits(lm, tokenizer, projector)
        if projector.vision_hidden != encoder_config.vision_hidden:
            raise MultimodalLMError(f"the projector takes width {projector.vision_hidden} but the image encoder "
                                    f"gives {encoder_config.vision_hidden}: train a new projector for this encoder")
        self.image_encoder, self.encoder_config = image_encoder, encoder_config
        self.projector_config, self.projector = projector, build_projector(projector)
        self.lm, self.tokenizer = lm, tokenizer
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.image_tokens = projector.tokens_per_image(encoder_config)
        self.question_fusion = QuestionFusion(encoder_config, MLPProjector(ProjectorConfig(
            encoder_config.text_hidden, projector.lm_hidden))) if projector.fuse_question else None
        self.question_tokenizer = question_tokenizer
        if projector.fuse_question and question_tokenizer is None:
            raise MultimodalLMError("fuse_question needs the pretraining tokenizer to read the instruction with")

    @classmethod
    def build(cls, encoder_export: str | Path, lm_name_or_dir: str, image_tokens: int = 0,
              projector: str = "mlp", fuse_question: bool = False) -> MultimodalLM:
        """A new model: a pretrained encoder, a pretrained LM and a freshly initialised projector (with
        `fuse_question`, the export's text and fusion encoders and a new projection of their [CLS])."""
        encoder, encoder_config = load_image_encoder(encoder_export)
        lm, tokenizer = load_causal_lm(lm_name_or_dir)
        config = ProjectorConfig(encoder_config.vision_hidden, lm.get_input_embeddings().embedding_dim,
                                 image_tokens, projector, fuse_question=fuse_question)
        question_tokenizer = load_question_tokenizer(encoder_export, encoder_config) if fuse_question else None
        model = cls(encoder, encoder_config, config, lm, tokenizer, question_tokenizer)
        if fuse_question:  # the whole ALBEF loads: its text encoder's word embeddings are stored as the MLM head's
            pretrained = ALBEF(encoder_config)
            load_model(pretrained, str(Path(encoder_export) / "model.safetensors"))
            model.question_fusion.copy_pretrained(pretrained)
        return model

    @classmethod
    def from_configs(cls, encoder_config: ModelConfig, projector: ProjectorConfig, lm_config,
                     tokenizer, question_tokenizer=None) -> MultimodalLM:
        """The model's shape to load weights into (built inside DeepSpeed's zero.Init, then loaded): the LM's
        own initialisation is skipped, as transformers does under ZeRO-3 (it cannot index partitioned weights)."""
        from transformers import AutoModelForCausalLM
        from transformers.initialization import no_init_weights

        encoder = VisionTransformer(encoder_config, check_backend(encoder_config.attention))
        with no_init_weights():
            lm = AutoModelForCausalLM.from_config(lm_config)
        lm.tie_weights()  # part of the skipped initialisation
        return cls(encoder, encoder_config, projector, lm, tokenizer, question_tokenizer)

    @classmethod
    def load(cls, base: str | Path, lm_name_or_dir: str | None = None, image_tokens: int = 0,
             projector: str = "mlp", fuse_question: bool = False) -> MultimodalLM:
        """A saved multimodal model as it is, or a pretraining export + an LM with a new projector."""
        if is_saved_multimodal(base):
            return cls.from_pretrained(base)
        return cls.build(base, lm_name_or_dir, image_tokens, projector, fuse_question)

    @classmethod
    def from_pretrained(cls, directory: str | Path, lm_name_or_dir: str | None = None) -> MultimodalLM:
        """A saved model; `lm_name_or_dir` swaps in another LM, which must fit the projector."""
        directory = Path(directory)
        if not is_saved_multimodal(directory):
            raise MultimodalLMError(f"{directory} has no {PROJECTOR_CONFIG}: pass a saved multimodal model directory")
        encoder, encoder_config = load_image_encoder(directory)
        lm, tokenizer = load_causal_lm(lm_name_or_dir or str(directory / "lm"))
        config = ProjectorConfig(**json.loads((directory / PROJECTOR_CONFIG).read_text()))
        question_tokenizer = load_question_tokenizer(directory, encoder_config) if config.fuse_question else None
        model = cls(encoder, encoder_config, config, lm, tokenizer, question_tokenizer)
        load_model(model.projector, str(directory / PROJECTOR_WEIGHTS))
        if model.question_fusion is not None:
            load_model(model.question_fusion, str(directory / QUESTION_WEIGHTS))
        return model

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.lm.save_pretrained(directory / "lm")
        self.tokenizer.save_pretrained(directory / "lm")
        save_model(self.image_encoder, str(directory / ENCODER_WEIGHTS))
        (directory / ENCODER_CONFIG).write_text(json.dumps(asdict(self.encoder_config), indent=2))
        save_model(self.projector, str(directory / PROJECTOR_WEIGHTS))
        (directory / PROJECTOR_CONFIG).write_text(json.dumps(asdict(self.projector_config), indent=2))
        if self.question_fusion is not None:
            save_model(self.question_fusion, str(directory / QUESTION_WEIGHTS))
            self.question_tokenizer.save_pretrained(directory / QUESTION_TOKENIZER)

    def set_training_stage(self, stage: str, lm_training: str = "full", train_encoder: bool = False,
                           lora_rank: int = 8, lora_alpha: int = 16, encoder_lr_scale: float = 1.0) -> None:
        """Which weights train: `align` the projector only (encoder and LM frozen, as LLaVA's stage 1);
        `instruct` the projector and the LM, fully or through LoRA adapters (HF peft, the LM's attention and
        MLP projections, peft's defaults for the architecture), and the image encoder with `train_encoder`.
        The question fusion's projection trains with the projector; its text and fusion encoders only with
        `train_encoder` (at the LM's learning rate they lose what pretraining taught them). The pretrained
        encoders' parameters carry `lr_scale = encoder_lr_scale`: the optimizer's groups give them that fraction of
        the learning rate."""
        if stage not in STAGES or lm_training not in LM_TRAINING:
            raise MultimodalLMError(f"training stage {stage!r} / LM training {lm_training!r} is unknown; use a stage "
                                    f"of {', '.join(STAGES)} and LM training of {', '.join(LM_TRAINING)}")
        if stage == "instruct" and lm_training == "lora":
            from peft import LoraConfig, get_peft_model

            self.lm = get_peft_model(self.lm, LoraConfig(r=lora_rank, lora_alpha=lora_alpha, task_type="CAUSAL_LM"))
        self.requires_grad_(False)
        self.projector.requires_grad_(True)
        if self.question_fusion is not None:
            self.question_fusion.requires_grad_(True)
        for part in self.pretrained_encoders():
            part.requires_grad_(stage == "instruct" and train_encoder)
            for param in part.parameters():
                param.lr_scale = encoder_lr_scale
        if stage == "instruct" and lm_training == "full":
            self.lm.requires_grad_(True)
        elif stage == "instruct":
            for name, param in self.lm.named_parameters():
                param.requires_grad_("lora_" in name)

    def pretrained_encoders(self) -> list[nn.Module]:
        """What the pretraining export provides besides the LM: the image encoder, and the question fusion's text
        and fusion encoders."""
        fusion = [] if self.question_fusion is None else self.question_fusion.pretrained_parts()
        return [self.image_encoder, *fusion]

    def question_inputs(self, texts: list[str]) -> Question:
        """Instructions (as data_pipeline.instructions.first_instruction gives them: cleaned as the pretraining
        captions were) in the pretraining tokenizer's ids, padded to the longest."""
        encoded = self.question_tokenizer(texts, padding=True, truncation=True, return_tensors="pt",
                                          max_length=self.encoder_config.max_position, return_token_type_ids=False)
        return encoded["input_ids"], encoded["attention_mask"]

    def encode_images(self, pixel_values: Tensor, question: Question | None = None) -> Tensor:
        """[B, 3, H, W] -> [B, image_tokens, lm_hidden] in the LM's dtype."""
        states = self.image_encoder(pixel_values)
        tokens = self.projector(states)
        if self.question_fusion is not None:
            if question is None:
                raise MultimodalLMError("this model fuses the instruction with the image (fuse_question): pass "
                                        "question=(ids, mask) from question_inputs")
            tokens = torch.cat([tokens, self.question_fusion(states, *question)], dim=1)
        return tokens.to(self.lm.get_input_embeddings().weight.dtype)

    def embed(self, input_ids: Tensor, pixel_values: Tensor, question: Question | None = None) -> Tensor:
        """The LM's token embeddings with row b's `<image>` positions replaced, in order, by image b's tokens."""
        is_image = input_ids == self.image_token_id
        counts = is_image.sum(dim=1)
        if (counts != self.image_tokens).any():
            raise MultimodalLMError(f"every sequence needs exactly {self.image_tokens} {IMAGE_TOKEN} tokens (one "
                                    f"image, expanded); got {sorted(set(counts.tolist()))}")
        embeds = self.lm.get_input_embeddings()(input_ids.masked_fill(is_image, 0))
        image = self.encode_images(pixel_values, question)
        return embeds.masked_scatter(is_image.unsqueeze(-1), image)

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                per_conversation: bool = False, question: Question | None = None) -> MultimodalLMOutput:
        """Next-token cross-entropy on the positions whose labels are not -100 (the assistant's tokens): the mean
        over the batch's answer tokens, or with `per_conversation` the mean of each conversation's mean, so that
        a one-word answer weighs as much as a caption of twenty tokens."""
        embeds = self.embed(input_ids, pixel_values, question)
        logits = self.lm(inputs_embeds=embeds, attention_mask=attention_mask).logits
        logits, targets = logits[:, :-1].float(), labels[:, 1:]
        labelled = targets != -100
        count = labelled.sum()
        token_loss = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
        if per_conversation:
            answered = labelled.sum(1)
            loss = (token_loss.sum(1) / answered.clamp(min=1)).sum() / (answered > 0).sum().clamp(min=1)
        else:
            loss = token_loss.sum() / count.clamp(min=1)
        accuracy = ((logits.argmax(-1) == targets) & labelled).sum() / count.clamp(min=1)
        return MultimodalLMOutput(loss, accuracy.detach(), count.float())

    @torch.no_grad()
    def generate(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor,
                 question: Question | None = None, **generate_kwargs) -> Tensor:
        """The LM's `generate()` on the prompt with the image in place: greedy by default, `num_beams` for
        beam search, `do_sample` (+ temperature/top_p) for sampling. Returns only the new tokens [B, T]."""
        context = getattr(self.lm.config.get_text_config(), "max_position_embeddings", None)
        if context is not None and input_ids.shape[1] >= context:
            raise MultimodalLMError(f"the prompt is {input_ids.shape[1]} tokens with the image, but the LM's context "
                                    f"is {context}: shorten the prompt or use fewer image tokens")
        generate_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        generate_kwargs.setdefault("eos_token_id", self.tokenizer.eos_token_id)
        return self.lm.generate(inputs_embeds=self.embed(input_ids, pixel_values, question),
                                attention_mask=attention_mask, **generate_kwargs)
