import pytest
import torch
from transformers import BertConfig, BertModel, ViTConfig, ViTModel

from pretrain.model import ALBEF, ModelConfigError, model_preset


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _meta(build):
    with torch.device("meta"):
        return build()


def test_unknown_preset_and_key_name_the_valid_ones():
    with pytest.raises(ModelConfigError, match="tiny, base, large"):
        model_preset("huge")
    with pytest.raises(ModelConfigError, match="unknown model config key.*vision_hiden.*valid keys.*vision_hidden"):
        model_preset("tiny", vision_hiden=64)
    with pytest.raises(ModelConfigError, match="flash_attn, sdpa, eager"):
        model_preset("tiny", attention="xformers")
    with pytest.raises(ModelConfigError, match="itm_negative_hardness -0.5 is negative"):
        model_preset("tiny", itm_negative_hardness=-0.5)


def test_overrides_apply():
    config = model_preset("tiny", vocab_size=1500, grad_checkpointing=True)
    assert (config.vocab_size, config.grad_checkpointing, config.image_size, config.patch_size) == (1500, True, 64, 8)


@pytest.mark.parametrize(("preset", "bert_layers"), [("base", 12), ("large", 24)])
def test_preset_encoders_are_vit_and_bert_of_their_size(preset, bert_layers):
    config = model_preset(preset)
    model = _meta(lambda: ALBEF(config))
    # The encoders are exactly ViT-B/L and BERT-base/large (without poolers), plus fresh cross-attention.
    hf_vit = _meta(lambda: ViTModel(ViTConfig(
        hidden_size=config.vision_hidden, num_hidden_layers=config.vision_layers,
        num_attention_heads=config.vision_heads, intermediate_size=config.vision_mlp,
        image_size=config.image_size, patch_size=16), add_pooling_layer=False))  # fmt: skip
    assert _count(model.image_encoder) == _count(hf_vit)
    hf_bert = _meta(lambda: BertModel(BertConfig(
        hidden_size=config.text_hidden, num_hidden_layers=bert_layers, num_attention_heads=config.text_heads,
        intermediate_size=config.text_intermediate), add_pooling_layer=False))  # fmt: skip
    d, dv = config.text_hidden, config.vision_hidden
    cross_attention = config.fusion_layers * (2 * (d * d + d) + 2 * (dv * d + d) + 2 * d)
    assert _count(model.text_encoder) + _count(model.fusion_encoder) == _count(hf_bert) + cross_attention


# The presets' exact parameter counts, base and large with BERT's 30,522-token vocabulary (docs/model.md's table).
TINY_FIXED, TINY_PER_TOKEN = 1_839_875, 129  # per vocabulary entry: a word-embedding row and a decoder bias


@pytest.mark.parametrize(
    ("preset", "vocab", "total"),
    [("tiny", 96, TINY_FIXED + TINY_PER_TOKEN * 96), ("tiny", 30522, TINY_FIXED + TINY_PER_TOKEN * 30522),
     ("base", 30522, 209_937_725), ("large", 30522, 689_408_317)],
)  # fmt: skip
def test_parameter_counts_are_exact(preset, vocab, total):
    """Tiny at two vocabularies, so its per-token term is checked too."""
    assert _count(_meta(lambda: ALBEF(model_preset(preset, vocab_size=vocab)))) == total


def test_conv_stem_halves_the_image_per_conv_down_to_the_patch_grid():
    torch.manual_seed(0)
    config = model_preset("tiny", vocab_size=100, patch_stem="conv")
    model = ALBEF(config)
    convs = [m for m in model.image_encoder.patch_embed if isinstance(m, torch.nn.Conv2d)]
    # 64 px, patch 8: three 3x3 stride-2 convs 3 -> 32 -> 64 -> 128, then a 1x1 conv 128 -> 128
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (3, 32, (3, 3), (2, 2)), (32, 64, (3, 3), (2, 2)), (64, 128, (3, 3), (2, 2)), (128, 128, (1, 1), (1, 1))]
    assert model.image_encoder(torch.randn(2, 3, 64, 64)).shape == (2, 1 + 64, 128)
    linear = ALBEF(model_preset("tiny", vocab_size=100))
    assert _count(model) - _count(linear) == (
        sum(_count(c) for c in convs) + 2 * (32 + 64 + 128) - _count(linear.image_encoder.patch_embed))
    for patch in (6, 1):
        with pytest.raises(ModelConfigError, match="power of 2"):
            model_preset("tiny", patch_stem="conv", patch_size=patch, image_size=48)
    with pytest.raises(ModelConfigError, match="linear, conv"):
        model_preset("tiny", patch_stem="hybrid")
