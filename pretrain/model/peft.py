"""Parameter-efficient fine-tuning of the model library's modules, injected by module name.

- `lora`: W + (alpha / r) * B A on the chosen linear layers, through Hugging Face peft (its tuners work
  on any nn.Module by target-module names); mergeable into W for export.
- `adapter`: a bottleneck after a sublayer's output projection (Houlsby): h + f(h W_down) W_up, W_up
  zero-initialised, so training starts from exactly the pretrained function. No maintained library has
  bottleneck adapters for custom modules, hence by hand.
- `prefix`: trainable key/value prefixes for the chosen attention layers (Li & Liang), through the attention
  functions of `attention.py` (every backend), produced by a reparametrisation MLP while training.

Targets are a regular expression that must match a module's whole name (peft's rule), e.g.
`.*text_encoder.*\\.(qkv|out)`. The base weights are frozen; only the method's weights (and the modules
named in `trained`, e.g. a task head) keep requires_grad.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import SelfAttention

PEFT_METHODS = ("none", "lora", "adapter", "prefix")


class PeftConfigError(ValueError):
    """A PEFT configuration cannot be applied to this model."""


@dataclass
class PeftConfig:
    method: str = "none"
    targets: str = ""  # regex over module names; empty: the method's default (DEFAULT_TARGETS)
    rank: int = 8  # lora rank r
    alpha: float = 16.0  # lora scale numerator: the update is (alpha / r) B A
    dropout: float = 0.0  # lora dropout on the update's input
    adapter_size: int = 32  # adapter bottleneck width
    prefix_length: int = 8  # prefix keys/values per attention layer
    prefix_hidden: int = 64  # width of the prefix reparametrisation MLP


# lora: every attention projection and FFN layer of every encoder; adapter: after each attention output and FFN
# output projection; prefix: every self-attention
DEFAULT_TARGETS = {
    "lora": r".*(qkv|query|key_value|attn\.out|fc1|fc2|ffn_in|ffn_out)",
    "adapter": r".*(attn\.out|fc2|ffn_out)",
    "prefix": r".*(attn|self_attn)",
}
_TARGET_TYPES = {"lora": nn.Linear, "adapter": nn.Linear, "prefix": SelfAttention}


def targets_of(config: PeftConfig) -> str:
    return config.targets or DEFAULT_TARGETS.get(config.method, "")


def matching_modules(model: nn.Module, config: PeftConfig) -> list[str]:
    """Names of the modules `config` would adapt; raises PeftConfigError when the configuration is unusable."""
    if config.method not in PEFT_METHODS:
        raise PeftConfigError(f"peft.method {config.method!r} is unknown; use one of {', '.join(PEFT_METHODS)}")
    if config.method == "none":
        return []
    for name, value in (("rank", config.rank), ("adapter_size", config.adapter_size),
                        ("prefix_length", config.prefix_length), ("prefix_hidden", config.prefix_hidden)):
        if value <= 0:
            raise PeftConfigError(f"peft.{name} is {value}: it must be a positive integer")
    pattern = targets_of(config)
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise PeftConfigError(f"peft.targets {pattern!r} is not a regular expression ({err}): fix it") from None
    kind = _TARGET_TYPES[config.method]
    names = [n for n, m in model.named_modules() if isinstance(m, kind) and regex.fullmatch(n)]
    if not names:
        raise PeftConfigError(f"peft.targets {pattern!r} matches no {kind.__name__} module for {config.method}: "
                              "module names look like image_encoder.blocks.0.attn.qkv or "
                              "fusion_encoder.layers.0.cross_attn.query; fix the pattern")
    return names


class Adapter(nn.Module):
    """A linear layer followed by a residual bottleneck: y + gelu(y W_down) W_up, W_up zero at the start."""

    def __init__(self, base: nn.Linear, size: int):
        super().__init__()
        self.base = base
        self.down = nn.Linear(base.out_features, size)
        self.up = nn.Linear(size, base.out_features)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        return y + self.up(F.gelu(self.down(y)))


class Prefix(nn.Module):
    """An attention layer's trainable key/value prefixes [P, H, Dh], each computed from a learned
    embedding by a tanh MLP (the reparametrisation that makes prefix tuning train stably)."""

    def __init__(self, length: int, hidden: int, heads: int, mlp_hidden: int):
        super().__init__()
        self.heads = heads
        self.embedding = nn.Parameter(torch.randn(length, hidden) * 0.02)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.Tanh(), nn.Linear(mlp_hidden, 2 * hidden))

    def forward(self) -> tuple[Tensor, Tensor]:
        keys, values = self.mlp(self.embedding).unflatten(-1, (2, self.heads, -1)).unbind(dim=1)
        return keys, values


def apply_peft(model: nn.Module, config: PeftConfig, trained: tuple[str, ...] = ()) -> list[str]:
    """Adapt `model` in place: freeze every base weight, inject the method's modules, and leave trainable
    only those and the parameters whose names start with one of `trained`. Full fine-tuning (`none`)
    trains everything. Returns the adapted module names. Call on a model whose weights are loaded."""
    names = matching_modules(model, config)
    if config.method == "none":
        return names
    for param in model.parameters():
        param.requires_grad_(False)
    if config.method == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                          target_modules=targets_of(config), bias="none")
        inject_adapter_in_model(lora, model)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        module = getattr(parent, child)
        if config.method == "adapter":
            setattr(parent, child, Adapter(module, config.adapter_size))
        elif config.method == "prefix":
            hidden = module.out.out_features
            module.prefix = Prefix(config.prefix_length, hidden, module.heads, config.prefix_hidden)
    for name, param in model.named_parameters():
        method_weight = any(part in name for part in ("lora_", ".prefix.")) or _is_adapter_weight(name)
        param.requires_grad_(method_weight or name.startswith(trained))
    return names


def _is_adapter_weight(name: str) -> bool:
    return re.search(r"\.(down|up)\.(weight|bias)$", name) is not None


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight and put the plain linear layers back (for export)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.get_base_layer())
    return model
