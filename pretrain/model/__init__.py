"""The ALBEF model library: configuration, attention, encoders, heads, objectives and Hugging Face weight I/O.

It imports nothing of the training application; cross-rank gathers come from `pretrain.distributed`.
"""

from .albef import ALBEF, ALBEFOutput, ImageStreams
from .attention import attention, packed_cross_attention, packed_self_attention
from .config import ATTENTION_BACKENDS, FUSIONS, ModelConfig, ModelConfigError, model_preset
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
from .momentum import FeatureQueue, MomentumTeacher, Teacher, online_config, online_state_dict
from .objectives import (
    HardNegatives,
    ITCResult,
    QueuedFeatures,
    itc_distill_loss,
    itc_loss,
    itm_loss,
    mlm_loss,
    sample_itm_negatives,
)
from .padding import KeyPadding

__all__ = [
    "ALBEF",
    "ALBEFOutput",
    "ATTENTION_BACKENDS",
    "FUSIONS",
    "FeatureQueue",
    "HFWeightsError",
    "HardNegatives",
    "ITCResult",
    "ImageStreams",
    "KeyPadding",
    "ModelConfig",
    "ModelConfigError",
    "MomentumTeacher",
    "QueuedFeatures",
    "Teacher",
    "attention",
    "bert_state_dict_to_ours",
    "export_hf",
    "itc_distill_loss",
    "itc_loss",
    "itm_loss",
    "load_pretrained",
    "mlm_loss",
    "model_preset",
    "online_config",
    "online_state_dict",
    "ours_to_bert_state_dict",
    "ours_to_vit_state_dict",
    "packed_cross_attention",
    "packed_self_attention",
    "pretrained_state_dict",
    "sample_itm_negatives",
    "vit_state_dict_to_ours",
]
