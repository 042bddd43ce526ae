"""BERT's masked-LM head; its decoder shares the word-embedding matrix (one Parameter, two modules)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig


class MLMHead(nn.Module):
    def __init__(self, config: ModelConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(config.text_hidden, config.text_hidden)
        self.norm = nn.LayerNorm(config.text_hidden, eps=config.text_layer_norm_eps)
        self.decoder = nn.Linear(config.text_hidden, config.vocab_size)
        self.decoder.weight = word_embeddings.weight

    def forward(self, hidden: Tensor) -> Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(hidden))))
