"""Training FLOPs per sample of ALBEF (for MFU): matmuls only, 2 FLOPs per multiply-add, backward = 2x
forward (the input and the weight gradient) except for the ViT patch embedding, whose input (the pixels)
needs no gradient: its backward is the weight gradient alone, 1x forward. Counts what `ALBEF.forward`
runs: the ViT once, the text encoder on clean and masked text, the fusion encoder on four text streams
(positive, hard-negative text, masked text, hard-negative image) with the cross-attention keys/values
projected once per image (own image and hard-negative image), the MLM head on the masked tokens. With
co-attention fusion every text stream carries an image stream of its own (keys/values projected per stream,
plus fusion_layers - 1 image-stream layers); with momentum distillation the teacher's forward (ViT, text
encoder on both texts, fusion of the masked text, ITC and MLM heads) counts once, with no backward. Leaves
out the ITC similarity matrices (O((global batch + queue) x embed_dim) per sample).

Text is counted on its real tokens: the text and fusion encoders run on the non-padding tokens only,
so `text_tokens` is the mean number of real tokens per caption (the padded length gives an upper
bound). Attention is counted as text_tokens^2 per caption, what flash-attn's varlen kernel does for
captions of equal length; the padded CPU kernels also score the padding (not counted).

The count is kept per component (`forward_flops_by_component`), each one what a set of modules runs,
so a test can hold every term against a FLOP counter's per-module breakdown.
"""

from __future__ import annotations

from pretrain.model.config import ModelConfig

# Backward / forward FLOPs of a component; the others take 2 (input and weight gradients).
_BACKWARD_RATIO = {"vision.patch_embed": 1.0, "momentum.teacher": 0.0}  # the teacher takes no gradient


def _linear(tokens: float, d_in: int, d_out: int) -> float:
    return 2.0 * tokens * d_in * d_out


def _attention(q_tokens: float, k_tokens: float, hidden: int) -> float:
    return 2 * 2.0 * q_tokens * k_tokens * hidden  # scores and the weighted sum of values


def _patch_embed(c: ModelConfig) -> dict[str, float]:
    """The linear patch embedding; or the conv stem's first conv (on the pixels: no input gradient) and the
    rest of its 3x3 stride-2 convs with the closing 1x1 conv."""
    if c.patch_stem == "linear":
        return {"vision.patch_embed": _linear(c.num_patches, 3 * c.patch_size**2, c.vision_hidden)}
    count, flops, width_in, side = c.patch_size.bit_length() - 1, [], 3, c.image_size
    for i in range(count):
        width, side = max(c.vision_hidden >> (count - 1 - i), 8), side // 2
        flops.append(_linear(side * side, 9 * width_in, width))
        width_in = width
    return {"vision.patch_embed": flops[0],
            "vision.stem": sum(flops[1:]) + _linear(c.num_patches, width_in, c.vision_hidden)}


def _bert_projections(c: ModelConfig, length: float) -> float:
    """A BERT layer's self-attention (fused QKV + out) and FFN projections."""
    d = c.text_hidden
    return _linear(length, d, 4 * d) + 2 * _linear(length, d, c.text_intermediate)


def _image_stream_layer(c: ModelConfig, image_tokens: float, length: float) -> dict[str, float]:
    """One co-attention image-stream layer on one stream: self-attention, cross-attention to the text, FFN."""
    d = c.vision_hidden
    return {
        "fusion.image_projections": _linear(image_tokens, d, 4 * d) + 2 * _linear(image_tokens, d, c.vision_mlp)
        + _linear(image_tokens, d, 2 * d) + _linear(length, c.text_hidden, 2 * d),  # + cross query, out; keys, values
        "fusion.image_attention": _attention(image_tokens, image_tokens, d) + _attention(image_tokens, length, d),
    }  # fmt: skip


def _encoders_and_heads(
    c: ModelConfig, length: float, mlm_probability: float, streams: int, images: int, texts: int = 2
) -> dict[str, float]:
    """One sample's forward through the ViT, the text encoder on `texts` captions (clean and masked, + the
    word-swapped one), the fusion encoder on `streams` text streams over `images` images, and the heads."""
    image_tokens = c.num_patches + 1
    co_attention = c.fusion == "co_attention"
    terms = {
        **_patch_embed(c),
        "vision.projections": c.vision_layers * (
            _linear(image_tokens, c.vision_hidden, 4 * c.vision_hidden)
            + 2 * _linear(image_tokens, c.vision_hidden, c.vision_mlp)
        ),
        "vision.self_attention": c.vision_layers * _attention(image_tokens, image_tokens, c.vision_hidden),
        "text.projections": texts * c.text_layers * _bert_projections(c, length),
        "text.self_attention": texts * c.text_layers * _attention(length, length, c.text_hidden),
        "fusion.projections": c.fusion_layers * streams * (
            _bert_projections(c, length) + _linear(length, c.text_hidden, 2 * c.text_hidden)  # + cross query, out
        ),
        "fusion.self_attention": c.fusion_layers * streams * _attention(length, length, c.text_hidden),
        # keys and values projected once per image; co-attention's image stream differs per text stream
        "fusion.cross_key_value": c.fusion_layers * (streams if co_attention else images)
        * _linear(image_tokens, c.vision_hidden, 2 * c.text_hidden),
        "fusion.cross_attention": c.fusion_layers * streams * _attention(length, image_tokens, c.text_hidden),
        "heads.itc": _linear(1, c.vision_hidden, c.embed_dim) + (texts - 1) * _linear(1, c.text_hidden, c.embed_dim),
        "heads.mlm": _linear(mlm_probability * length, c.text_hidden, c.text_hidden + c.vocab_size),
    }  # fmt: skip
    if co_attention:
        for name, flops in _image_stream_layer(c, image_tokens, length).items():
            terms[name] = (c.fusion_layers - 1) * streams * flops
    return terms


def forward_flops_by_component(
    config: ModelConfig, text_tokens: float, mlm_probability: float = 0.15, swap_negatives: bool = False
) -> dict[str, float]:
    """Forward FLOPs of one sample per component: `*.projections` are an encoder's linear layers,
    `*_attention` the attention products (scores and weighted sum of values) of its layers; co-attention adds
    its image stream's (`fusion.image_*`), momentum distillation its teacher's forward (`momentum.teacher`);
    `swap_negatives` (data.swap_negatives) is one more caption through the text encoder and ITC's projection."""
    # fusion text streams per sample: positive, hard-negative text, masked text (own image), hard-negative image
    terms = _encoders_and_heads(config, text_tokens, mlm_probability, streams=4, images=2,
                                texts=3 if swap_negatives else 2)
    terms["heads.itm"] = _linear(3, config.text_hidden, 2)  # the positive and the two hard negatives
    if config.weight_words:
        terms["heads.words"] = _linear(1, config.vision_hidden, config.vocab_size)
    if config.momentum_distillation:  # the teacher fuses the masked text with its own image only
        terms["momentum.teacher"] = sum(_encoders_and_heads(config, text_tokens, mlm_probability, 1, 1).values())
    return terms


def train_flops_by_component(
    config: ModelConfig, text_tokens: float, mlm_probability: float = 0.15, swap_negatives: bool = False
) -> dict[str, float]:
    """Forward + backward FLOPs of one sample per component (see `forward_flops_by_component`)."""
    forward = forward_flops_by_component(config, text_tokens, mlm_probability, swap_negatives)
    return {name: (1 + _BACKWARD_RATIO.get(name, 2.0)) * flops for name, flops in forward.items()}


def train_flops_per_sample(config: ModelConfig, text_tokens: float, mlm_probability: float = 0.15,
                           swap_negatives: bool = False) -> float:
    """Forward + backward FLOPs of one training sample (ITC + ITM + MLM) whose caption has `text_tokens`
    real tokens, `mlm_probability` of them masked."""
    return sum(train_flops_by_component(config, text_tokens, mlm_probability, swap_negatives).values())


def encoder_forward_flops(config: ModelConfig, text_tokens: float = 0.0) -> float:
    """Forward FLOPs of the ViT on one image and, with `text_tokens`, of one text of that many tokens through
    the text and fusion encoders over it (the multimodal LM's instruction fused with the image)."""
    terms = _encoders_and_heads(config, text_tokens, 0.0, streams=1, images=1, texts=1)
    parts = ("vision.", "text.", "fusion.") if text_tokens else ("vision.",)
    return sum(flops for name, flops in terms.items() if name.startswith(parts))
