"""Training FLOPs per sample of ALBEF (for MFU): matmuls only, 2 FLOPs per multiply-add, backward = 2x
forward. Counts what `ALBEF.forward` runs: the ViT once, the text encoder on clean and masked text, the
fusion encoder on four text streams (positive, hard-negative text, masked text, hard-negative image)
with the cross-attention keys/values projected once per image (own image and hard-negative image),
the MLM head on the masked tokens. Leaves out the ITC similarity matrix (O(global batch x embed_dim)).

Text is counted on its real tokens: the text and fusion encoders run on the non-padding tokens only,
so `text_tokens` is the mean number of real tokens per caption (the padded length gives an upper
bound). Attention scores are counted as text_tokens^2 per caption, what flash-attn's varlen kernel
does for captions of equal length; the padded CPU kernels also score the padding (not counted).
"""

from __future__ import annotations

from pretrain.model.config import ModelConfig


def _linear(tokens: float, d_in: int, d_out: int) -> float:
    return 2.0 * tokens * d_in * d_out


def _attention(q_tokens: float, k_tokens: float, hidden: int) -> float:
    return 2 * 2.0 * q_tokens * k_tokens * hidden  # scores and the weighted sum of values


def _bert_layer(c: ModelConfig, length: float) -> float:
    d = c.text_hidden
    return _linear(length, d, 4 * d) + _attention(length, length, d) + 2 * _linear(length, d, c.text_intermediate)


def forward_flops_per_sample(config: ModelConfig, text_tokens: float, mlm_probability: float = 0.15) -> float:
    c, length = config, text_tokens
    image_tokens = c.num_patches + 1
    vit = _linear(c.num_patches, 3 * c.patch_size**2, c.vision_hidden) + c.vision_layers * (
        _linear(image_tokens, c.vision_hidden, 4 * c.vision_hidden)
        + _attention(image_tokens, image_tokens, c.vision_hidden)
        + 2 * _linear(image_tokens, c.vision_hidden, c.vision_mlp)
    )
    text = 2 * c.text_layers * _bert_layer(c, length)
    cross_per_stream = _linear(length, c.text_hidden, 2 * c.text_hidden) + _attention(
        length, image_tokens, c.text_hidden
    )
    cross_kv_per_image = _linear(image_tokens, c.vision_hidden, 2 * c.text_hidden)
    fusion = c.fusion_layers * (4 * (_bert_layer(c, length) + cross_per_stream) + 2 * cross_kv_per_image)
    heads = (
        _linear(1, c.vision_hidden, c.embed_dim)
        + _linear(1, c.text_hidden, c.embed_dim)
        + _linear(3, c.text_hidden, 2)
        + _linear(mlm_probability * length, c.text_hidden, c.text_hidden + c.vocab_size)
    )
    return vit + text + fusion + heads


def train_flops_per_sample(config: ModelConfig, text_tokens: float, mlm_probability: float = 0.15) -> float:
    """Forward + backward FLOPs of one training sample (ITC + ITM + MLM) whose caption has `text_tokens`
    real tokens, `mlm_probability` of them masked."""
    return 3 * forward_flops_per_sample(config, text_tokens, mlm_probability)
