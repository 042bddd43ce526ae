"""Hugging Face weights in and out: ViT into the image encoder, BERT into the text encoder and the
self-attention / FFN of the fusion layers (cross-attention stays fresh, as in ALBEF), and export back
to `ViTModel` / `BertModel` directories that `AutoModel.from_pretrained` loads.

The `*_to_ours` functions are pure name/shape mappings (HF state dict -> our parameter names), so a
ZeRO-3 trainer can copy the result into partitioned parameters under `GatheredParameters` itself.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from pretrain.distributed import rank

from .config import ModelConfig


class HFWeightsError(ValueError):
    """A Hugging Face checkpoint does not fit the model configuration."""


# (our name, HF names) per layer; several HF names are concatenated (dim 0) into one fused projection.
_VIT_LAYER = [
    ("norm1", ("layernorm_before",)), ("norm2", ("layernorm_after",)),
    ("attn.qkv", ("attention.q_proj", "attention.k_proj", "attention.v_proj")),
    ("attn.out", ("attention.o_proj",)), ("fc1", ("mlp.fc1",)), ("fc2", ("mlp.fc2",)),
]  # fmt: skip
_BERT_LAYER = [
    ("self_attn.qkv", ("attention.self.query", "attention.self.key", "attention.self.value")),
    ("self_attn.out", ("attention.output.dense",)), ("self_attn_norm", ("attention.output.LayerNorm",)),
    ("ffn_in", ("intermediate.dense",)), ("ffn_out", ("output.dense",)), ("ffn_norm", ("output.LayerNorm",)),
]  # fmt: skip
_PARAMS = ("weight", "bias")

# Older transformers releases and the files on the Hub spell ViT's names differently.
_VIT_OLD_NAMES = [
    (r"^vit\.", ""), (r"^encoder\.layer\.", "layers."),
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."), (r"\.output\.dense\.", ".mlp.fc2."),
]  # fmt: skip
_BERT_OLD_NAMES = [(r"^bert\.", ""), (r"\.gamma$", ".weight"), (r"\.beta$", ".bias")]
_VIT_IGNORED = re.compile(r"^(pooler|classifier)\.")
_BERT_IGNORED = re.compile(r"^(pooler\.|cls\.seq_relationship\.|cls\.predictions\.decoder\.|embeddings\.position_ids$)")


def _normalise(state_dict: Mapping[str, Tensor], renames: list[tuple[str, str]]) -> dict[str, Tensor]:
    out = {}
    for name, tensor in state_dict.items():
        for old, new in renames:
            name = re.sub(old, new, name)
        out[name] = tensor
    return out


def _vit_names(config: ModelConfig) -> dict[str, tuple[str, ...]]:
    names = {
        "image_encoder.cls_token": ("embeddings.cls_token",),
        "image_encoder.pos_embed": ("embeddings.position_embeddings",),
        **{f"image_encoder.patch_embed.{p}": (f"embeddings.patch_embeddings.projection.{p}",) for p in _PARAMS},
        **{f"image_encoder.norm.{p}": (f"layernorm.{p}",) for p in _PARAMS},
    }
    for i in range(config.vision_layers):
        for ours, theirs in _VIT_LAYER:
            for p in _PARAMS:
                names[f"image_encoder.blocks.{i}.{ours}.{p}"] = tuple(f"layers.{i}.{t}.{p}" for t in theirs)
    return names


def _bert_names(config: ModelConfig, with_fusion: bool) -> dict[str, tuple[str, ...]]:
    names = {
        f"text_encoder.embeddings.{e}.weight": (f"embeddings.{e}.weight",)
        for e in ("word_embeddings", "position_embeddings", "token_type_embeddings")
    }
    names.update({f"text_encoder.embeddings.norm.{p}": (f"embeddings.LayerNorm.{p}",) for p in _PARAMS})
    layers = [(f"text_encoder.layers.{i}", i) for i in range(config.text_layers)]
    if with_fusion:
        layers += [(f"fusion_encoder.layers.{i}", config.text_layers + i) for i in range(config.fusion_layers)]
    for prefix, j in layers:
        for ours, theirs in _BERT_LAYER:
            for p in _PARAMS:
                names[f"{prefix}.{ours}.{p}"] = tuple(f"encoder.layer.{j}.{t}.{p}" for t in theirs)
    return names


_MLM_HEAD_NAMES = {
    "mlm_head.dense.weight": ("cls.predictions.transform.dense.weight",),
    "mlm_head.dense.bias": ("cls.predictions.transform.dense.bias",),
    "mlm_head.norm.weight": ("cls.predictions.transform.LayerNorm.weight",),
    "mlm_head.norm.bias": ("cls.predictions.transform.LayerNorm.bias",),
    "mlm_head.decoder.bias": ("cls.predictions.bias",),
}


def _expected_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    from .albef import ALBEF

    with torch.device("meta"):
        model = ALBEF(config)
    return {name: p.shape for name, p in model.named_parameters(remove_duplicate=False)}


def _map(
    theirs: dict[str, Tensor],
    names: dict[str, tuple[str, ...]],
    ignored: re.Pattern,
    config: ModelConfig,
    what: str,
    resizable: tuple[str, ...] = (),
) -> dict[str, Tensor]:
    wanted = {h for hs in names.values() for h in hs}
    missing = sorted(wanted - set(theirs))
    unknown = sorted(h for h in set(theirs) - wanted if not ignored.search(h))
    if missing or unknown:
        raise HFWeightsError(
            f"{what} checkpoint does not fit the model config: missing {missing[:4]} ({len(missing)} in all), "
            f"unexpected {unknown[:4]} ({len(unknown)} in all); check the layer counts of the preset"
        )
    expected, wrong = _expected_shapes(config), []
    for ours, hs in names.items():
        part = (expected[ours][0] // len(hs), *expected[ours][1:])
        wrong += [
            f"{h} {tuple(theirs[h].shape)} for {ours} {part}"
            for h in hs
            if theirs[h].shape != part and h not in resizable
        ]
    if wrong:
        raise HFWeightsError(f"{what} checkpoint shapes do not fit the model config: {'; '.join(wrong[:3])}")
    return {ours: torch.cat([theirs[h] for h in hs]) if len(hs) > 1 else theirs[hs[0]] for ours, hs in names.items()}


def _interpolate_positions(pos_embed: Tensor, num_patches: int) -> Tensor:
    """Resize learned patch positions [1, 1 + n, D] to another grid (bicubic), keeping [CLS]'s."""
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    old, new = int(grid.shape[1] ** 0.5), int(num_patches**0.5)
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, new * new, -1).to(pos_embed.dtype)], dim=1)


def vit_state_dict_to_ours(state_dict: Mapping[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """A `ViTModel` state dict as our `image_encoder.*` parameters; positions resized to our image size."""
    theirs = _normalise(state_dict, _VIT_OLD_NAMES)
    positions = "embeddings.position_embeddings"
    mapped = _map(theirs, _vit_names(config), _VIT_IGNORED, config, "ViT", resizable=(positions,))
    pos = mapped["image_encoder.pos_embed"]
    if pos.shape[1] != config.num_patches + 1:
        if pos.shape[::2] != (1, config.vision_hidden):
            raise HFWeightsError(f"ViT position embeddings {tuple(pos.shape)} do not fit hidden {config.vision_hidden}")
        mapped["image_encoder.pos_embed"] = _interpolate_positions(pos, config.num_patches)
    return mapped


def bert_state_dict_to_ours(state_dict: Mapping[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """A `BertModel` / `BertForMaskedLM` state dict as our text encoder, fusion self-attention / FFN
    (BERT layers text_layers.. onwards) and, when present, MLM head parameters."""
    theirs = _normalise(state_dict, _BERT_OLD_NAMES)
    names = _bert_names(config, with_fusion=True)
    if any(name.startswith("cls.predictions.") for name in theirs):
        names.update(_MLM_HEAD_NAMES)
    return _map(theirs, names, _BERT_IGNORED, config, "BERT")


def _to_hf(state_dict: Mapping[str, Tensor], names: dict[str, tuple[str, ...]]) -> dict[str, Tensor]:
    return {h: part for ours, hs in names.items() for h, part in zip(hs, state_dict[ours].chunk(len(hs)))}


def ours_to_vit_state_dict(state_dict: Mapping[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    return _to_hf(state_dict, _vit_names(config))


def ours_to_bert_state_dict(state_dict: Mapping[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    return _to_hf(state_dict, _bert_names(config, with_fusion=False))


def _check_hf_config(hf_config, expected: dict, what: str) -> None:
    wrong = [f"{k}={getattr(hf_config, k, None)!r} (ours {v!r})" for k, v in expected.items()
             if getattr(hf_config, k, None) != v]  # fmt: skip
    if wrong:
        raise HFWeightsError(f"{what} checkpoint config does not fit the model config: {', '.join(wrong)}")


def _vit_config(config: ModelConfig):
    from transformers import ViTConfig

    return ViTConfig(
        hidden_size=config.vision_hidden, num_hidden_layers=config.vision_layers,
        num_attention_heads=config.vision_heads, intermediate_size=config.vision_mlp,
        image_size=config.image_size, patch_size=config.patch_size, layer_norm_eps=config.vision_layer_norm_eps,
        hidden_act="gelu", qkv_bias=True,
    )  # fmt: skip


def _bert_config(config: ModelConfig, layers: int):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=config.vocab_size, hidden_size=config.text_hidden, num_hidden_layers=layers,
        num_attention_heads=config.text_heads, intermediate_size=config.text_intermediate,
        max_position_embeddings=config.max_position, type_vocab_size=config.type_vocab_size,
        layer_norm_eps=config.text_layer_norm_eps, hidden_act="gelu",
    )  # fmt: skip


def _from_pretrained(cls, name: str, what: str):
    try:
        return cls.from_pretrained(name)
    except OSError as error:
        raise HFWeightsError(f"cannot load {what} weights {name!r}: {str(error).splitlines()[0]}") from None


def pretrained_state_dict(config: ModelConfig, vit: str | None = None, bert: str | None = None) -> dict[str, Tensor]:
    """Hugging Face weights (names or local directories) mapped to our parameter names and checked."""
    from transformers import BertForMaskedLM, ViTModel

    loaded = {}
    if vit is not None:
        hf = _from_pretrained(ViTModel, vit, "ViT")
        c = _vit_config(config)
        keys = ("hidden_size", "num_attention_heads", "patch_size", "hidden_act", "layer_norm_eps")
        _check_hf_config(hf.config, {k: getattr(c, k) for k in keys}, "ViT")
        loaded.update(vit_state_dict_to_ours(hf.state_dict(), config))
    if bert is not None:
        hf = _from_pretrained(BertForMaskedLM, bert, "BERT")
        c = _bert_config(config, config.text_layers + config.fusion_layers)
        keys = ("num_hidden_layers", "num_attention_heads", "hidden_act", "layer_norm_eps")
        _check_hf_config(hf.config, {k: getattr(c, k) for k in keys}, "BERT")
        loaded.update(bert_state_dict_to_ours(hf.state_dict(), config))
    return loaded


def load_pretrained(model: torch.nn.Module, vit: str | None = None, bert: str | None = None) -> None:
    """Copy Hugging Face weights into an ALBEF, plain or partitioned by ZeRO-3: one parameter gathered at
    a time, rank 0 writes it, and the gather re-partitions it to every rank."""
    if not (vit or bert):
        return
    import deepspeed  # imported here: the library is usable without starting DeepSpeed's accelerator probe

    params = dict(model.named_parameters())
    for name, value in pretrained_state_dict(model.config, vit=vit, bert=bert).items():
        # a no-op on parameters that ZeRO-3 did not partition
        with deepspeed.zero.GatheredParameters([params[name]], modifier_rank=0), torch.no_grad():
            if rank() == 0:
                params[name].copy_(value.to(params[name].dtype))


def export_hf(model: torch.nn.Module, out_dir: str | Path) -> None:
    """Write `out_dir/image_encoder` (ViTModel) and `out_dir/text_encoder` (BertModel, the text_layers
    unimodal layers). With `patch_stem: conv` only `text_encoder`: HF's ViTModel has no conv stem.

    ALBEF trains no pooler (its ITC heads project [CLS] themselves), and nothing in config.json stops
    `AutoModel` from building one, so each export carries a pooler of zeros: every weight is on disk (no
    random initialisation on load) and `pooler_output` is all zeros rather than plausible noise.
    """
    from transformers import BertModel, ViTModel

    config, out_dir = model.config, Path(out_dir)
    ours = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    encoders = [(BertModel, _bert_config(config, config.text_layers), ours_to_bert_state_dict(ours, config),
                 "text_encoder")]
    if config.patch_stem == "linear":  # a conv stem has no ViTModel counterpart: no image_encoder/ then
        encoders.insert(0, (ViTModel, _vit_config(config), ours_to_vit_state_dict(ours, config), "image_encoder"))
    for cls, hf_config, state_dict, sub in encoders:
        hf = cls(hf_config)
        pooler = {f"pooler.{name}": torch.zeros_like(p) for name, p in hf.pooler.named_parameters()}
        hf.load_state_dict({**state_dict, **pooler}, strict=True)
        hf.save_pretrained(out_dir / sub)
