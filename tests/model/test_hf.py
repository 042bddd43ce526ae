import pytest
import torch
from transformers import AutoModel, BertForMaskedLM, BertModel, ViTModel

from pretrain.model import (
    ALBEF,
    HFWeightsError,
    KeyPadding,
    bert_state_dict_to_ours,
    export_hf,
    load_pretrained,
    vit_state_dict_to_ours,
)
from tests.helpers.hf import hf_bert, hf_vit
from tests.helpers.model import make_batch, tiny_config


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    hf_vit(64).save_pretrained(root / "vit")
    hf_vit(32).save_pretrained(root / "vit32")
    hf_bert().save_pretrained(root / "bert")
    return root


def _loaded(checkpoints, vit="vit") -> ALBEF:
    """Ours with the checkpoints' weights, in float64: equivalence with HF is checked where rounding is
    ~1e-16, so the comparison is independent of the CPU's float32 accumulation order."""
    torch.manual_seed(0)  # the parameters no checkpoint sets (cross-attention, ITC/ITM heads)
    model = ALBEF(tiny_config(attention="eager")).eval()
    load_pretrained(model, vit=str(checkpoints / vit), bert=str(checkpoints / "bert"))
    return model.double()


def _hf(cls, path, **kwargs):
    return cls.from_pretrained(path, **kwargs).eval().double()


def _double_batch(config) -> dict:
    batch = make_batch(config)
    batch["pixel_values"] = batch["pixel_values"].double()
    return batch


EXACT = dict(atol=1e-10, rtol=1e-10)  # float64: what is left is summation order


def test_loaded_encoders_reproduce_hf_outputs(checkpoints):
    model = _loaded(checkpoints)
    batch = _double_batch(model.config)
    with torch.no_grad():
        hf_image = _hf(ViTModel, checkpoints / "vit")(batch["pixel_values"]).last_hidden_state
        torch.testing.assert_close(model.encode_image(batch["pixel_values"])[0], hf_image, **EXACT)
        hf_bert = _hf(BertForMaskedLM, checkpoints / "bert")
        hidden = hf_bert.bert(batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        ours, _ = model.encode_text(batch["input_ids"], batch["attention_mask"])
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[valid], hidden.hidden_states[2][valid], **EXACT)
    # Fusion layers start from BERT layers 2-3 (self-attention and FFN); the MLM head from BERT's.
    fusion = model.fusion_encoder.layers[1]
    hf_layer = hf_bert.bert.encoder.layer[3]
    torch.testing.assert_close(fusion.self_attn.qkv.weight[128:256], hf_layer.attention.self.key.weight)
    torch.testing.assert_close(fusion.ffn_norm.bias, hf_layer.output.LayerNorm.bias)
    torch.testing.assert_close(model.mlm_head.decoder.bias, hf_bert.cls.predictions.bias)
    assert model.mlm_head.decoder.weight is model.text_encoder.embeddings.word_embeddings.weight


def test_the_mlm_head_is_loaded_from_bert_for_masked_lm(checkpoints):
    """The transform (dense, GELU, LayerNorm) and the decoder bias come from `cls.predictions`, the decoder
    weight is the word embeddings: the head's logits are HF's on the same hidden states."""
    model = _loaded(checkpoints)
    hf_bert = _hf(BertForMaskedLM, checkpoints / "bert")
    transform = hf_bert.cls.predictions.transform
    for ours, theirs in ((model.mlm_head.dense, transform.dense), (model.mlm_head.norm, transform.LayerNorm)):
        assert torch.equal(ours.weight, theirs.weight) and torch.equal(ours.bias, theirs.bias)
    assert model.mlm_head.norm.eps == transform.LayerNorm.eps
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(20, model.config.text_hidden, generator=g, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model.mlm_head(hidden), hf_bert.cls(hidden), **EXACT)


def test_text_encoder_gradients_equal_hf_bert_on_a_padded_batch(checkpoints):
    """Ours packs the real tokens, HF BERT computes on the padded batch: same outputs and gradients."""
    model = _loaded(checkpoints)
    hf_bert = _hf(BertModel, checkpoints / "bert", add_pooling_layer=False)
    batch = make_batch(model.config)
    valid = batch["attention_mask"].bool()
    assert not valid.all()
    weights = torch.randn(*valid.shape, 128, generator=torch.Generator().manual_seed(0), dtype=torch.float64)[valid]
    hidden = hf_bert(batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    (hidden.hidden_states[model.config.text_layers][valid] * weights).sum().backward()
    ours = model.text_encoder(batch["input_ids"], KeyPadding(valid))
    (ours[valid] * weights).sum().backward()
    hf_grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in hf_bert.named_parameters()}
    expected = bert_state_dict_to_ours(hf_grads, model.config)
    for name, p in model.text_encoder.named_parameters():
        assert p.grad.abs().max() > 0, name
        torch.testing.assert_close(p.grad, expected[f"text_encoder.{name}"], **EXACT)


def test_positions_are_interpolated_like_hf(checkpoints):
    """Ours resizes a checkpoint's positions once at load (bicubic, computed in float32), HF at every forward:
    the same values to float32 rounding, and with those values the same encoder."""
    model = _loaded(checkpoints, vit="vit32")  # checkpoint at 32 px, model at 64 px
    hf = _hf(ViTModel, checkpoints / "vit32")
    pixels = _double_batch(model.config)["pixel_values"]
    c = model.config
    with torch.no_grad():
        expected = hf.embeddings.interpolate_pos_encoding(
            torch.empty(1, 1 + c.num_patches, c.vision_hidden), c.image_size, c.image_size)  # fmt: skip
        ours = model.image_encoder.pos_embed
        # Bicubic weights of one output sum to 1 in absolute value 1.25 at most; float32 arithmetic on them
        # and the final rounding leave each value within a few float32 steps of the largest input.
        float32_steps = 4 * torch.finfo(torch.float32).eps * expected.abs().max().item()
        torch.testing.assert_close(ours, expected, rtol=0, atol=float32_steps)
        assert (ours[0, 1:] - ours[0, 1:].mean(dim=0)).abs().max() > 1000 * float32_steps  # positions differ
        ours.copy_(expected)
        reference = hf(pixels, interpolate_pos_encoding=True).last_hidden_state
        torch.testing.assert_close(model.encode_image(pixels)[0], reference, **EXACT)


def test_export_round_trip_through_automodel(checkpoints, tmp_path):
    torch.manual_seed(0)
    model = ALBEF(tiny_config(attention="eager")).eval().double()
    export_hf(model, tmp_path)
    batch = _double_batch(model.config)
    encoders = {}
    for sub in ("image_encoder", "text_encoder"):  # every weight on disk: nothing initialised at random on load
        hf, info = AutoModel.from_pretrained(tmp_path / sub, output_loading_info=True)
        assert {k: v for k, v in info.items() if v} == {}, (sub, info)
        encoders[sub] = hf.eval().double()
    with torch.no_grad():
        image = encoders["image_encoder"](batch["pixel_values"])
        torch.testing.assert_close(image.last_hidden_state, model.encode_image(batch["pixel_values"])[0], **EXACT)
        text = encoders["text_encoder"](batch["input_ids"], attention_mask=batch["attention_mask"])
        ours = model.text_encoder(batch["input_ids"], KeyPadding(batch["attention_mask"].bool()))
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(text.last_hidden_state[valid], ours[valid], **EXACT)
    # ALBEF trains no pooler: the export's is zeros, so pooler_output is zeros and never plausible noise
    for output in (image, text):
        assert output.pooler_output.shape[0] == 6 and not output.pooler_output.any()


def test_mismatched_checkpoints_fail_with_one_clear_error():
    config = tiny_config()
    with pytest.raises(HFWeightsError, match="missing.*encoder.layer.3"):
        bert_state_dict_to_ours(hf_bert(layers=3).state_dict(), config)
    with pytest.raises(HFWeightsError, match="unexpected.*encoder.layer.4"):
        bert_state_dict_to_ours(hf_bert(layers=5).state_dict(), config)
    with pytest.raises(HFWeightsError, match="shapes do not fit.*word_embeddings"):
        bert_state_dict_to_ours(hf_bert(hidden=64).state_dict(), config)
    vit = hf_vit(64).state_dict()
    vit["layers.0.attention.q_proj.weight"] = torch.zeros(128, 64)
    with pytest.raises(HFWeightsError, match=r"q_proj.weight \(128, 64\) for image_encoder.blocks.0.attn.qkv.weight"):
        vit_state_dict_to_ours(vit, config)


def test_hub_style_names_map_like_current_ones():
    """Files on the Hub (and older transformers) spell ViT's and BERT's names the old way."""
    config = tiny_config()
    current = hf_vit(64).state_dict()
    old = {
        k.replace("layers.", "encoder.layer.")
        .replace("attention.q_proj", "attention.attention.query")
        .replace("attention.o_proj", "attention.output.dense")
        .replace("mlp.fc1", "intermediate.dense")
        .replace("mlp.fc2", "output.dense"): v
        for k, v in current.items()
    }
    old = {k.replace("attention.k_proj", "attention.attention.key").replace(
        "attention.v_proj", "attention.attention.value"): v for k, v in old.items()}  # fmt: skip
    from_old, from_current = vit_state_dict_to_ours(old, config), vit_state_dict_to_ours(current, config)
    assert from_old.keys() == from_current.keys()
    for name, value in from_current.items():  # the values too: a swapped query/key would keep the key set
        assert torch.equal(from_old[name], value), name
    current_bert = hf_bert().state_dict()
    old_bert = {"bert." + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
                if k.startswith(("embeddings", "encoder")) else k: v for k, v in current_bert.items()}  # fmt: skip
    from_old, from_current = bert_state_dict_to_ours(old_bert, config), bert_state_dict_to_ours(current_bert, config)
    assert from_old.keys() == from_current.keys()
    for name, value in from_current.items():
        assert torch.equal(from_old[name], value), name


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(HFWeightsError, match="cannot load ViT weights"):
        load_pretrained(ALBEF(tiny_config()), vit=str(tmp_path / "nowhere"))
