"""Training recipes: typed sections loaded from YAML, overridable from the command line.

A recipe is one YAML file per experiment. Every field below is also a CLI flag named
`--section.field` (e.g. `--optim.lr 3e-4`), so `python -m pretrain.train --help` lists every option.
Recipes that ship with the project live in `pretrain/recipes/` and can be named without a path.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import yaml

from data_pipeline.images import DEFAULT_MIN_SIDE

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"


class RecipeError(ValueError):
    """A recipe, override or config the user wrote is wrong; the message says how to fix it."""


def _help(text: str, default=dataclasses.MISSING, factory=dataclasses.MISSING):
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


def run_name(default: str):
    """The `name` field with an app's default run name."""
    return _help("run name: outputs go to <logging.run_dir>/<name>/", default)


@dataclass
class ModelSection:
    preset: str = _help("model preset: tiny | base | large", "tiny")
    overrides: dict = _help("ModelConfig fields to override, e.g. {attention: sdpa}", factory=dict)
    vit: str | None = _help("HF name or local dir of a ViTModel to initialise the image encoder", None)
    bert: str | None = _help("HF name or local dir of a BertModel to initialise text + fusion encoders", None)
    fusion: str = _help("cross_attention (ALBEF) | co_attention (ViLBERT's two streams)", "cross_attention")
    patch_stem: str = _help("linear (ViT's patch embedding; exported as a Hugging Face ViTModel) | conv (ViT_C's "
                            "conv stem: aligns faster on the synthetic default, no HF image encoder)", "linear")
    dropout: float = _help("BERT dropout in the text and fusion encoders (BERT, ALBEF: 0.1)", 0.0)
    momentum_distillation: bool = _help("ALBEF's momentum distillation for ITC and MLM (EMA teacher, "
                                        "distill_alpha ramped over the first epoch)", False)
    queue_size: int = _help("ITC keys queued from past batches' teacher features (ALBEF: 65536; needs "
                            "momentum_distillation)", 0)
    itm_negative_hardness: float = _help("ITM negatives drawn by softmax(hardness x ITC logit): 1 as ALBEF (the "
                                         "hardest pair, once ITC is sharp), 0 uniformly from the batch", 1.0)
    caption_words_weight: float = _help("weight of caption-word classification from the mean patch state (SuperClass): "
                                        "a direct signal for what an image shows; 0 as ALBEF", 0.0)


@dataclass
class DataSection:
    train: str = _help("train shards: directory with manifest.json, brace pattern or weighted list",
                       "data/shards/synthetic/train")
    val: str | None = _help("validation shards for retrieval evaluation (None: no evaluation)",
                            "data/shards/synthetic/val")
    tokenizer: str = _help("HF tokenizer name or local directory", "data/tokenizer")
    mode: str = _help("epoch (exact epochs, split by rank and worker) | resampled (infinite)", "epoch")
    num_workers: int = _help("DataLoader worker processes per rank", 1)
    max_len: int = _help("caption length in tokens (padding/truncation)", 32)
    crop_scale: tuple[float, float] = _help("random resized crop scale range (ALBEF: [0.2, 1.0])", (0.2, 1.0))
    hflip: bool = _help("random horizontal flip; a flipped image's caption has 'left' and 'right' swapped", True)
    randaugment: tuple[int, int] = _help("RandAugment [ops, magnitude of 10] without colour-changing ops "
                                         "(ALBEF: [2, 7]; ops 0: off)", (2, 7))
    pairs: str = _help("random_caption: every image once per epoch with one random caption | every_caption: every "
                       "(image, caption) pair once per epoch (ALBEF)", "random_caption")
    mlm_probability: float = _help("fraction of caption tokens masked for MLM", 0.15)
    max_bad_fraction: float = _help("stop with an error once more than this fraction of the samples a loader "
                                    "worker read were skipped as broken (1.0: never)", 0.1)
    min_side: int = _help("skip training images whose shorter side is under this, counted as image_too_small "
                          "(make shards' MIN_SIDE already drops them; this catches shards from other writers; "
                          "0: keep all)", DEFAULT_MIN_SIDE)


@dataclass
class PretrainDataSection(DataSection):
    swap_negatives: list[list[str]] = _help("groups of interchangeable words, e.g. [[circle, square, triangle]]: each "
                                            "caption's copy with one group word swapped is an extra image-to-text "
                                            "ITC negative (NegCLIP; [] off; not with momentum_distillation)",
                                            factory=list)


@dataclass
class OptimSection:
    lr: float = _help("peak learning rate", 1e-4)
    min_lr_ratio: float = _help("final learning rate as a fraction of the peak (cosine floor)", 0.01)
    weight_decay: float = _help("AdamW weight decay (never applied to norms, biases, temperature)", 0.02)
    betas: tuple[float, float] = _help("AdamW betas", (0.9, 0.999))
    eps: float = _help("AdamW epsilon", 1e-8)
    max_nonfinite_steps: int = _help("stop after this many optimizer steps in a row were skipped for a non-finite "
                                     "loss or gradient (0: never stop)", 10)


@dataclass
class ScheduleSection:
    micro_batch_size: int = _help("samples per rank per forward pass", 32)
    grad_accum: int = _help("micro-batches accumulated per optimizer step", 1)
    max_steps: int = _help("optimizer steps to train", 1000)
    warmup_steps: int = _help("linear warmup steps before cosine decay", 100)
    exit_at_step: int = _help("end this job at this step with a checkpoint, schedule unchanged, for time-limited "
                              "allocations; resume with --resume auto (0: run to max_steps)", 0)


@dataclass
class LoggingSection:
    run_dir: str = _help("parent directory of runs; this run writes to <run_dir>/<name>/", "runs")
    every: int = _help("console line + TensorBoard scalars every N steps", 10)
    peak_tflops: float = _help("stated peak TFLOP/s per device for MFU (bf16 dense H100: 989)", 989.0)


@dataclass
class CheckpointSection:
    every: int = _help("save a checkpoint every N optimizer steps (0: only at the end)", 500)
    keep: int = _help("keep the newest K checkpoints", 2)


@dataclass
class EvalSection:
    every: int = _help("retrieval evaluation every N steps (0: only at the end)", 0)
    batch_size: int = _help("images/texts per forward pass during evaluation", 64)
    itm_rerank_k: int = _help("re-rank the top k by ITM (0: ITC only; ALBEF: 256 COCO, 128 Flickr)", 0)


@dataclass
class DistSection:
    ds_config: str = _help("DeepSpeed JSON (path, or a name in ds_configs/)", "ds_configs/cpu_zero3.json")
    backend: str = _help("torch.distributed backend: nccl on GPUs, gloo on CPU", "gloo")
    timeout_minutes: float = _help("collective timeout: a hung rank fails the job after this long", 10.0)
    watchdog_minutes: float = _help("report a rank that stays this long in one phase of a step, with its step, "
                                    "phase and stacks (0: off)", 5.0)

    @property
    def timeout(self) -> timedelta:
        return timedelta(minutes=self.timeout_minutes)


@dataclass
class RunRecipe:
    """The sections every app's recipe shares (pretraining, fine-tuning, instruction tuning, the caption LM):
    an app's recipe subclasses this, adds its own sections and narrows `data`/`eval` where it must."""

    name: str = run_name("run")
    seed: int = _help("global seed (initialisation, data order, masking)", 0)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    dist: DistSection = field(default_factory=DistSection)

    @property
    def run_path(self) -> Path:
        return Path(self.logging.run_dir) / self.name


@dataclass
class Recipe(RunRecipe):
    name: str = run_name("tiny-synthetic")
    data: PretrainDataSection = field(default_factory=PretrainDataSection)
    model: ModelSection = field(default_factory=ModelSection)


def _sections(cls: type = Recipe) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}


def _coerce(value, annotation, where: str):
    """Convert YAML/CLI values to the annotated type; None stays None where the type allows it."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        annotation = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    try:
        if origin is list:
            if not isinstance(value, list | tuple):
                raise TypeError
            return [_coerce(v, args[0], where) for v in value]
        if origin is tuple:
            if not isinstance(value, list | tuple) or len(value) != len(args):
                raise TypeError
            return tuple(_coerce(v, a, where) for v, a in zip(value, args))
        if annotation is dict or origin is dict:
            if not isinstance(value, dict):
                raise TypeError
            return dict(value)
        if annotation is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if annotation is float and isinstance(value, int | float | str) and not isinstance(value, bool):
            return float(value)  # YAML 1.1 reads "1e-3" (no dot) as a string
        if annotation is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if annotation is str and isinstance(value, str):
            return value
    except (TypeError, ValueError):
        pass
    name = str(annotation) if origin is list else getattr(annotation, "__name__", str(annotation))
    raise RecipeError(f"recipe key {where} must be {name}, got {value!r}: fix the value in the recipe "
                      "or on the command line")


def recipe_from_dict(raw: dict, cls: type = Recipe):
    """Build a recipe of dataclass `cls` (Recipe, or another app's), rejecting keys that do not exist (a typo
    must not silently do nothing)."""
    hints = typing.get_type_hints(cls)
    sections = _sections(cls)
    recipe = cls()
    for key, value in (raw or {}).items():
        if key not in hints:
            raise RecipeError(f"unknown recipe key '{key}': valid keys are {sorted(hints)}")
        if key not in sections:
            setattr(recipe, key, _coerce(value, hints[key], key))
            continue
        section_hints = typing.get_type_hints(sections[key])
        if not isinstance(value, dict):
            raise RecipeError(f"recipe section '{key}' must be a mapping of {sorted(section_hints)}")
        section = getattr(recipe, key)
        for sub, sub_value in value.items():
            if sub not in section_hints:
                raise RecipeError(f"unknown recipe key '{key}.{sub}': valid keys in '{key}' are "
                                  f"{sorted(section_hints)}")
            setattr(section, sub, _coerce(sub_value, section_hints[sub], f"{key}.{sub}"))
    return recipe


def resolve_recipe_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = RECIPE_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    available = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
    raise RecipeError(f"recipe '{name_or_path}' not found: pass a YAML path or one of {available}")


def add_recipe_arguments(parser: argparse.ArgumentParser, cls: type = Recipe) -> None:
    """One `--section.field` flag per recipe field, help text and default taken from the dataclasses."""
    hints = typing.get_type_hints(cls)
    sections = _sections(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        if f.name in sections:
            group = parser.add_argument_group(f"recipe section '{f.name}'")
            section_default = getattr(defaults, f.name)
            section_hints = typing.get_type_hints(sections[f.name])
            for sf in dataclasses.fields(sections[f.name]):
                group.add_argument(f"--{f.name}.{sf.name}", default=None, metavar="VALUE",
                                   help=f"{sf.metadata['help']} [{section_hints[sf.name]}; default: "
                                        f"{getattr(section_default, sf.name)!r}]")
        else:
            parser.add_argument(f"--{f.name}", default=None, metavar="VALUE",
                                help=f"{f.metadata['help']} [{hints[f.name]}; default: {getattr(defaults, f.name)!r}]")


def load_recipe(recipe: str | None, args: argparse.Namespace | None = None, cls: type = Recipe):
    """Recipe file (or defaults) with CLI overrides applied; override values are parsed as YAML."""
    raw: dict = {}
    if recipe:
        path = resolve_recipe_path(recipe)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise RecipeError(f"recipe {path} is not valid YAML ({err.__class__.__name__}): fix its syntax") from err
        if not isinstance(raw, dict):
            raise RecipeError(f"recipe {path} must be a YAML mapping of sections")
    for key, text in vars(args or argparse.Namespace()).items():
        if text is None or not _is_recipe_flag(key, cls):
            continue
        value = yaml.safe_load(text)
        section, _, sub = key.partition(".")
        if sub:
            raw.setdefault(section, {})
            if not isinstance(raw[section], dict):
                raise RecipeError(f"recipe section '{section}' must be a mapping")
            raw[section][sub] = value
        else:
            raw[section] = value
    return recipe_from_dict(raw, cls)


def _is_recipe_flag(dest: str, cls: type) -> bool:
    head = dest.partition(".")[0]
    return head in typing.get_type_hints(cls)
