"""The ALBEF model library: configuration, attention, encoders, heads and Hugging Face weight I/O."""

from .albef import ALBEF, ALBEFOutput
from .attention import attention, packed_cross_attention, packed_self_attention
from .config import ATTENTION_BACKENDS, ModelConfig, ModelConfigError, model_preset
from .hf_io import (
    HFWeightsError,
    bert_state_dict_to_ours,
    export_hf,
    load_pretrained,
    ours_to_bert_state_dict,
    ours_to_vit_state_dict,
    pretrained_state_dict,
    vit_state_dict_to_ours,
)
from .padding import KeyPadding

__all__ = [
    "ALBEF",
    "ALBEFOutput",
    "ATTENTION_BACKENDS",
    "HFWeightsError",
    "KeyPadding",
    "ModelConfig",
    "ModelConfigError",
    "attention",
    "packed_cross_attention",
    "packed_self_attention",
    "bert_state_dict_to_ours",
    "export_hf",
    "load_pretrained",
    "model_preset",
    "ours_to_bert_state_dict",
    "ours_to_vit_state_dict",
    "pretrained_state_dict",
    "vit_state_dict_to_ours",
]
