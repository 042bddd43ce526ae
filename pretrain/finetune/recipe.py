"""Fine-tuning recipes: the pretraining recipe's run sections plus `base`, `task` and `peft`.

The model's shape comes from the base (its model_config.json); `model.overrides` may change only how it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pretrain.train.recipe import DataSection, RunRecipe, _help, run_name


@dataclass
class BaseSection:
    path: str = _help("the pretrained model: a run's export/ directory, or its checkpoints/ directory",
                      "runs/tiny-synthetic/export")


@dataclass
class TaskSection:
    name: str = _help("vqa (answer classification) | retrieval (ITC + ITM)", "vqa")
    answers: int = _help("vqa: classify over this many most frequent training answers", 3129)
    min_answer_coverage: float = _help("vqa: refuse an answer vocabulary that covers less than this fraction of "
                                       "the training answers", 0.9)


@dataclass
class PeftSection:
    method: str = _help("none (full fine-tuning) | lora | adapter | prefix", "lora")
    targets: str = _help("regex matching whole module names to adapt ('': the method's default; see "
                         "docs/finetuning.md)", "")
    rank: int = _help("lora: rank r", 8)
    alpha: float = _help("lora: the update is (alpha / r) B A", 16.0)
    dropout: float = _help("lora: dropout on the update's input", 0.0)
    adapter_size: int = _help("adapter: bottleneck width", 32)
    prefix_length: int = _help("prefix: key/value prefixes per attention layer", 8)
    prefix_hidden: int = _help("prefix: width of the reparametrisation MLP", 64)


@dataclass
class FinetuneModelSection:
    overrides: dict = _help("execution fields of the base's ModelConfig to change, e.g. {attention: eager, "
                            "dropout: 0.1}", factory=dict)


@dataclass
class FinetuneDataSection(DataSection):
    tokenizer: str | None = _help("HF tokenizer name or directory (None: the base export's tokenizer/)", None)


@dataclass
class FinetuneRecipe(RunRecipe):
    name: str = run_name("finetune")
    base: BaseSection = field(default_factory=BaseSection)
    task: TaskSection = field(default_factory=TaskSection)
    peft: PeftSection = field(default_factory=PeftSection)
    model: FinetuneModelSection = field(default_factory=FinetuneModelSection)
    data: FinetuneDataSection = field(default_factory=FinetuneDataSection)
