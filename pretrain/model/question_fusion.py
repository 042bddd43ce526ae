"""InstructBLIP's instruction-aware visual input on our ALBEF parts: the instruction, read by the pretrained
text encoder and fused with the image by the fusion encoder, gives one more image token ([CLS] of the fused
states, projected to the LM's width) after the projector's.

A 2-layer caption LM did not learn to match "is there a red circle?" against plain image tokens (it answered
presence questions from the prior), while the fusion encoder is trained to score text against an image
(docs/instruction_tuning.md).
"""

from __future__ import annotations

from torch import Tensor, nn

from .attention import check_backend
from .bert import TextEncoder
from .config import ModelConfig
from .fusion import build_fusion_encoder
from .padding import KeyPadding


class QuestionFusion(nn.Module):
    def __init__(self, config: ModelConfig, projection: nn.Module):
        """`projection`: fused [CLS] [B, 1, D_t] -> [B, 1, lm_hidden] (the multimodal LM's MLP projector)."""
        super().__init__()
        backend = check_backend(config.attention)
        self.text_encoder = TextEncoder(config, backend)
        self.fusion_encoder = build_fusion_encoder(config, backend)
        self.projection = projection

    def forward(self, image_states: Tensor, question_ids: Tensor, question_mask: Tensor) -> Tensor:
        """Image token states [B, N, D_v] and the tokenized instruction [B, L] -> [B, 1, lm_hidden]."""
        padding = KeyPadding(question_mask.bool())
        fused = self.fusion_encoder(self.text_encoder(question_ids, padding), padding, image_states)
        return self.projection(fused[:, :1])

    def pretrained_parts(self) -> list[nn.Module]:
        """What a pretraining export provides (the projection to the LM is new)."""
        return [self.text_encoder, self.fusion_encoder]

    def copy_pretrained(self, albef: nn.Module) -> None:
        """The text and fusion encoders' weights from a pretrained ALBEF."""
        self.text_encoder.load_state_dict(albef.text_encoder.state_dict())
        self.fusion_encoder.load_state_dict(albef.fusion_encoder.state_dict())
