"""Co-attention fusion: the encoder equals a hand-written ViLBERT co-attention reference; the attention
backends agree on it (and on the rest of the model with momentum distillation); ITM's grouping holds."""

import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.model import ALBEF, KeyPadding, attention
from pretrain.model.attention import FLASH_ATTN_INSTALLED, packed_key_attention
from pretrain.model.fusion import CoAttentionFusionEncoder
from tests.helpers.model import make_batch, tiny_config


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(-1, (heads, -1)).transpose(-3, -2)  # [S, L, D] -> [S, H, L, Dh]


def _attend(queries, keys, weights_q, weights_k, weights_v, out, heads, key_mask=None):
    """Multi-head attention written out: separate query / key / value weights (w, b) and output Linear."""
    q, k, v = (_heads(x @ w.T + b, heads) for x, (w, b) in ((queries, weights_q), (keys, weights_k), (keys, weights_v)))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return out((scores.softmax(dim=-1) @ v).transpose(-3, -2).flatten(-2))


def _split(linear: torch.nn.Linear, parts: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(zip(linear.weight.chunk(parts), linear.bias.chunk(parts)))


def _self_attention(module, x, heads, key_mask=None):
    return _attend(x, x, *_split(module.qkv, 3), module.out, heads, key_mask)


def _cross_attention(module, x, context, heads, key_mask=None):
    return _attend(x, context, (module.query.weight, module.query.bias), *_split(module.key_value, 2), module.out,
                   heads, key_mask)


def _reference(encoder: CoAttentionFusionEncoder, text, mask, image, heads, image_stream=True):
    """ViLBERT's co-attention on padded tensors: each text stream with its own copy of its image; in each layer
    both streams read the other's states from before the layer; post-norm residual blocks. Without
    `image_stream` the image stays as it came in (cross-attention fusion with these text layers)."""
    image = image.repeat_interleave(len(text) // len(image), dim=0)
    for i, t in enumerate(encoder.text_layers):
        x = t.self_attn_norm(text + _self_attention(t.self_attn, text, heads, mask))
        x = t.cross_attn_norm(x + _cross_attention(t.cross_attn, x, image, heads))
        new_text = t.ffn_norm(x + t.ffn_out(F.gelu(t.ffn_in(x))))
        if image_stream and i < len(encoder.image_layers):
            m = encoder.image_layers[i]
            y = m.self_attn_norm(image + _self_attention(m.self_attn, image, heads))
            y = m.cross_attn_norm(y + _cross_attention(m.cross_attn, y, text, heads, mask))
            image = m.ffn_norm(y + m.ffn_out(F.gelu(m.ffn_in(y))))
        text = new_text
    return text


def test_co_attention_encoder_equals_a_hand_written_reference():
    config = tiny_config(fusion="co_attention", fusion_layers=3, attention="eager")
    torch.manual_seed(0)
    encoder = CoAttentionFusionEncoder(config, "eager").double().eval()
    assert len(encoder.text_layers) == 3 and len(encoder.image_layers) == 2
    g = torch.Generator().manual_seed(1)
    text = torch.randn(4, 7, config.text_hidden, generator=g, dtype=torch.float64)
    mask = torch.arange(7)[None, :] < torch.tensor([7, 3, 5, 1])[:, None]
    image = torch.randn(2, config.num_patches + 1, config.vision_hidden, generator=g, dtype=torch.float64)
    ours = encoder(text * mask[..., None], KeyPadding(mask), image)  # two text streams per image
    expected = _reference(encoder, text, mask, image, config.text_heads)
    torch.testing.assert_close(ours[mask], expected[mask], atol=1e-10, rtol=1e-10)
    assert ours[~mask].abs().max() == 0
    # the image stream matters: the same text layers against the unchanged image differ
    without_image_stream = _reference(encoder, text, mask, image, config.text_heads, image_stream=False)
    assert (without_image_stream[mask] - expected[mask]).abs().max() > 1e-3


def _grads(model: ALBEF, batch: dict):
    model.double()
    batch = {**batch, "pixel_values": batch["pixel_values"].double()}
    torch.manual_seed(5)  # the same ITM negatives in both runs
    out = model(batch)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("variant", [{"attention": "sdpa"}, {"grad_checkpointing": True}],
                         ids=["sdpa_vs_eager", "grad_checkpointing"])
@pytest.mark.parametrize("model", [{"fusion": "co_attention"}, {"momentum_distillation": True, "queue_size": 8}],
                         ids=["co_attention", "momentum_distillation"])
def test_an_execution_variant_gives_the_same_loss_and_gradients(model, variant):
    batch = make_batch(tiny_config())
    torch.manual_seed(0)
    reference = ALBEF(tiny_config(attention="eager", **model))
    other = ALBEF(tiny_config(**{"attention": "eager", **model, **variant}))
    other.load_state_dict(reference.state_dict())
    out_reference, grads_reference = _grads(reference, batch)
    out_other, grads_other = _grads(other, batch)
    for field in ("loss", "loss_itc", "loss_itm", "loss_mlm"):
        torch.testing.assert_close(getattr(out_other, field), getattr(out_reference, field), atol=1e-12, rtol=1e-12)
    assert grads_other.keys() == grads_reference.keys() and len(grads_reference) > 50
    for name, grad in grads_reference.items():
        torch.testing.assert_close(grads_other[name], grad, atol=1e-12, rtol=1e-10)
    for name, buffer in reference.state_dict().items():  # the teacher and queue moved alike
        torch.testing.assert_close(other.state_dict()[name], buffer, atol=1e-12, rtol=1e-10)


def test_co_attention_trains_and_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = ALBEF(tiny_config(fusion="co_attention"))
    out, grads = _grads(model, make_batch(model.config))
    assert [n for n, p in model.named_parameters() if n not in grads or grads[n].abs().sum() == 0] == []
    assert out.loss_itm > 0 and out.loss_mlm > 0 and 0 <= out.mlm_accuracy <= 1


def test_itm_logits_group_texts_per_image_with_co_attention():
    torch.manual_seed(0)
    model = ALBEF(tiny_config(fusion="co_attention")).eval().double()
    batch = make_batch(model.config, batch_size=4)
    with torch.no_grad():
        image_embeds, _ = model.encode_image(batch["pixel_values"][:1].double())
        text_embeds, _ = model.encode_text(batch["input_ids"], batch["attention_mask"])
        grouped = model.itm_logits(image_embeds, text_embeds, batch["attention_mask"])
        repeated = model.itm_logits(image_embeds.expand(4, -1, -1), text_embeds, batch["attention_mask"])
    torch.testing.assert_close(grouped, repeated, atol=1e-12, rtol=1e-12)


def _image_to_text_case(dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(0)
    keys = KeyPadding((torch.arange(7)[None, :] < torch.tensor([7, 4, 1])[:, None]).to(device))
    q = torch.randn(3, 10, 2, 32, generator=g, dtype=torch.float64).to(device, dtype)
    k, v = (torch.randn(3, 7, 2, 32, generator=g, dtype=torch.float64).to(device, dtype) for _ in range(2))
    return q, keys.unpad(k), keys.unpad(v), keys


def test_image_queries_to_packed_text_keys_sdpa_equals_eager():
    q, k, v, keys = _image_to_text_case()
    eager = packed_key_attention(q, k, v, backend="eager", keys=keys)
    torch.testing.assert_close(packed_key_attention(q, k, v, backend="sdpa", keys=keys), eager)
    # one real key in sequence 2: each of its queries returns that key's value
    torch.testing.assert_close(eager[2], v[-1:].expand(10, -1, -1))


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and FLASH_ATTN_INSTALLED), reason="needs CUDA and flash-attn")
def test_image_queries_to_packed_text_keys_flash_attn_varlen_equals_eager():
    q, k, v, keys = _image_to_text_case(torch.bfloat16, "cuda")
    flash = packed_key_attention(q, k, v, backend="flash_attn", keys=keys)
    reference = attention(q.float(), keys.pad(k).float(), keys.pad(v).float(), backend="eager", key_padding=keys)
    torch.testing.assert_close(flash.float(), reference, atol=2e-2, rtol=2e-2)
