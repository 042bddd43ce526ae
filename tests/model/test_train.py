from collections import defaultdict

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pretrain.model import ALBEF
from pretrain.model.attention import CrossAttention, SelfAttention, TextCrossAttention
from pretrain.model.objectives import caption_words_loss
from pretrain.model.question_fusion import QuestionFusion
from pretrain.model.vit import VisionTransformer
from pretrain.train.flops import (
    encoder_forward_flops,
    forward_flops_by_component,
    train_flops_by_component,
    train_flops_per_sample,
)
from tests.helpers.model import make_batch, tiny_config


def _grads(model: ALBEF, batch: dict) -> dict:
    """Loss outputs and gradients in float64: two implementations compared there differ by summation order
    alone (~1e-15), on any CPU."""
    model.double()
    batch = {**batch, "pixel_values": batch["pixel_values"].double()}
    torch.manual_seed(5)  # the same ITM negatives in both runs
    model.zero_grad()
    out = model(batch)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_a_few_steps_drive_all_three_losses_down():
    torch.manual_seed(0)
    model = ALBEF(tiny_config()).train()
    batch = make_batch(model.config, batch_size=8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    history = []
    for _ in range(30):
        out = model(batch)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        history.append(out)
    first, last = history[0], history[-1]
    assert last.loss_itc < 0.1 * first.loss_itc
    assert last.loss_mlm < 0.2 * first.loss_mlm
    # below 0.64, the loss of always answering "no match" at ITM's 1 positive : 2 negatives
    assert last.loss_itm < 0.5 < first.loss_itm
    assert last.itc_positive_sim > last.itc_negative_sim + 0.3
    assert 0.001 <= float(last.temperature) <= 0.5


def test_output_fields_and_parameters_all_get_gradients():
    torch.manual_seed(0)
    model = ALBEF(tiny_config())
    out, grads = _grads(model, make_batch(model.config))
    assert torch.isclose(out.loss, out.loss_itc + out.loss_itm + out.loss_mlm)
    assert out.temperature.dim() == 0 and not out.temperature.requires_grad
    assert 0 <= out.itm_accuracy <= 1
    assert model.temp.shape == (1,)
    assert [n for n, g in grads.items() if g.abs().sum() == 0] == []
    segments = grads["text_encoder.embeddings.token_type_embeddings.weight"]
    assert segments[0].abs().sum() > 0 and segments[1:].abs().sum() == 0  # every token is segment 0, as in ALBEF


def test_loss_weights_and_temperature_clamp():
    batch = make_batch(tiny_config())
    torch.manual_seed(0)
    model = ALBEF(tiny_config(weight_itm=0.0, weight_mlm=2.0))
    with torch.no_grad():
        model.temp.fill_(5.0)
        out = model(batch)
        assert torch.isclose(out.loss, out.loss_itc + 2 * out.loss_mlm)
        assert float(out.temperature) == pytest.approx(0.5)
        model.temp.fill_(1e-5)
        assert float(model(batch).temperature) == pytest.approx(0.001)


def test_every_parameter_is_used_inside_its_own_modules_forward():
    """ZeRO-3 fetches a partitioned parameter through its module's forward hooks; a weight read from outside
    (as `token_type_embeddings.weight[0]` was) goes through its slow external-parameter path instead."""
    torch.manual_seed(0)
    model = ALBEF(tiny_config())
    owners = {name: m for name, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None}
    called = set()
    for name, module in owners.items():
        module.register_forward_hook(lambda m, args, out, name=name: called.add(name))
    model(make_batch(model.config))
    assert "text_encoder.embeddings.token_type_embeddings" in owners
    assert set(owners) - called == set()


@pytest.mark.parametrize(("raw", "bound"), [(0.8, 0.5), (1e-4, 0.001)])
def test_a_temperature_past_a_bound_gets_only_the_gradient_that_brings_it_back(raw, bound):
    torch.manual_seed(0)
    model = ALBEF(tiny_config())
    with torch.no_grad():
        model.temp.fill_(raw)
    inward = 1.0 if raw > bound else -1.0  # the sign of a gradient whose descent step moves back inside
    for sign, expected in ((inward, inward), (-inward, 0.0)):
        model.zero_grad()
        (sign * model.temperature()).sum().backward()
        assert model.temp.grad.item() == expected


def test_a_temperature_pushed_past_a_bound_comes_back_under_an_optimizer():
    # A plain clamp has zero gradient past the bound: the raw value would stay at 0.8 for ever.
    torch.manual_seed(0)
    model = ALBEF(tiny_config())
    with torch.no_grad():
        model.temp.fill_(0.8)
    optimizer = torch.optim.SGD([model.temp], lr=0.5)
    for _ in range(50):
        optimizer.zero_grad()
        ((model.temperature() - 0.3) ** 2).sum().backward()
        optimizer.step()
    assert model.temp.item() == pytest.approx(0.3, abs=1e-3)


@pytest.mark.parametrize("variant", [{"grad_checkpointing": True}, {"attention": "sdpa"}],
                         ids=["grad_checkpointing", "sdpa_vs_eager"])
def test_an_execution_variant_gives_the_same_loss_and_gradients(variant):
    batch = make_batch(tiny_config())
    torch.manual_seed(0)
    reference = ALBEF(tiny_config(attention="eager"))
    other = ALBEF(tiny_config(**{"attention": "eager", **variant}))
    other.load_state_dict(reference.state_dict())
    out_reference, grads_reference = _grads(reference, batch)
    out_other, grads_other = _grads(other, batch)
    torch.testing.assert_close(out_other.loss, out_reference.loss, atol=1e-12, rtol=1e-12)
    for name, grad in grads_reference.items():
        torch.testing.assert_close(grads_other[name], grad, atol=1e-12, rtol=1e-10)


def test_itm_logits_groups_texts_per_image():
    torch.manual_seed(0)
    model = ALBEF(tiny_config()).eval().double()
    batch = make_batch(model.config, batch_size=4)
    batch["pixel_values"] = batch["pixel_values"].double()
    with torch.no_grad():
        image_embeds, _ = model.encode_image(batch["pixel_values"][:1])
        text_embeds, _ = model.encode_text(batch["input_ids"], batch["attention_mask"])
        grouped = model.itm_logits(image_embeds, text_embeds, batch["attention_mask"])
        repeated = model.itm_logits(image_embeds.expand(4, -1, -1), text_embeds, batch["attention_mask"])
    assert grouped.shape == (4, 2)
    torch.testing.assert_close(grouped, repeated, atol=1e-12, rtol=1e-12)


def _counted_flops(model: ALBEF, batch: dict) -> dict[str, int]:
    """FLOPs per aten op of a training step, per sample."""
    with FlopCounterMode(display=False) as counter:
        model(batch).loss.backward()
    return {str(op): n / len(batch["input_ids"]) for op, n in counter.get_flop_counts()["Global"].items()}



def test_caption_words_objective_adds_its_loss_and_trains_only_the_image_side():
    """weight_words adds the caption-word loss of the mean patch state; its gradient reaches the image encoder and
    its head, never the text side. Off (ALBEF), the head does not exist and the loss is 0."""
    torch.manual_seed(0)
    assert not hasattr(ALBEF(tiny_config()), "words_head")
    model = ALBEF(tiny_config(weight_words=0.5, weight_itc=0.0, weight_itm=0.0, weight_mlm=0.0))
    batch = make_batch(model.config)
    out, grads = _grads(model, batch)
    assert out.loss_words > 0 and torch.isclose(out.loss, 0.5 * out.loss_words)
    with torch.no_grad():
        head = model.words_head(model.image_encoder(batch["pixel_values"].double())[:, 1:].mean(dim=1))
    assert out.loss_words.item() == pytest.approx(
        caption_words_loss(head, batch["input_ids"], batch["attention_mask"]).item(), rel=1e-12)
    trained = {n.split(".")[0] for n, g in grads.items() if g.abs().sum() > 0}
    assert trained == {"image_encoder", "words_head"}

_HEADS = {"vision_proj": "heads.itc", "text_proj": "heads.itc", "itm_head": "heads.itm", "mlm_head": "heads.mlm",
          "words_head": "heads.words"}
_ENCODERS = {"image_encoder": "vision", "text_encoder": "text", "fusion_encoder": "fusion"}


def _forward_flops_by_component(model: ALBEF, batch: dict) -> tuple[dict[str, float], float]:
    """The counter's per-module breakdown of a forward, per sample, grouped as the formula's components
    (linear layers by where they sit; an attention module's own work beyond its projections is its
    attention products), and the FLOPs ALBEF.forward runs outside its submodules. Only the forward: the counter's module
    tracker attributes backward FLOPs to the wrong modules (the text embeddings get most of them)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(batch)
    size = len(batch["input_ids"])
    counts = {name.removeprefix("ALBEF."): sum(ops.values()) / size for name, ops in counter.get_flop_counts().items()}
    components: dict[str, float] = defaultdict(float)
    for name, module in model.named_modules():
        top, flops = name.split(".")[0], counts.get(name, 0.0)
        own = flops - sum(counts.get(f"{name}.{child}", 0.0) for child, _ in module.named_children())
        if top == "momentum":  # the teacher's whole forward
            components["momentum.teacher"] += flops if name == top else 0.0
        elif top in _HEADS:
            components[_HEADS[top]] += flops if name == top else 0.0
        elif isinstance(module, nn.Conv2d):  # the conv stem's first conv sees the pixels, the rest "vision.stem"
            first = name in ("image_encoder.patch_embed", "image_encoder.patch_embed.0")
            components["vision.patch_embed" if first else "vision.stem"] += flops
        elif ".image_layers." in name:  # co-attention's image stream
            if isinstance(module, nn.Linear):
                components["fusion.image_projections"] += flops
            elif isinstance(module, (SelfAttention, TextCrossAttention)):
                components["fusion.image_attention"] += own
        elif isinstance(module, nn.Linear):
            kind = "cross_key_value" if name.endswith("cross_attn.key_value") else "projections"
            components[f"{_ENCODERS[top]}.{kind}"] += flops
        elif isinstance(module, (SelfAttention, CrossAttention)):
            kind = "cross_attention" if isinstance(module, CrossAttention) else "self_attention"
            components[f"{_ENCODERS[top]}.{kind}"] += own
    assert counts["ALBEF"] == counts["Global"]
    return dict(components), counts["ALBEF"] - sum(counts.get(child, 0.0) for child, _ in model.named_children())


@pytest.mark.parametrize("variant", [{}, {"fusion": "co_attention"}, {"momentum_distillation": True},
                                     {"patch_stem": "conv"}, {"weight_words": 1.0}, {"swap_negatives": True}],
                         ids=["cross_attention", "co_attention", "momentum_distillation", "conv_stem", "words",
                              "swap_negatives"])
def test_train_flops_match_the_flop_counter_term_by_term(variant):
    """Every term of the formula equals what the counter sees the modules run, exactly (integers in floats):
    dropping any term (the cross-attention products, the patch embedding, a head, co-attention's image
    stream, the teacher...) or miscounting its backward fails."""
    torch.manual_seed(0)
    swap = variant.pop("swap_negatives", False)
    config = tiny_config(attention="eager", **variant)  # the counter sees eager attention's matmuls
    model = ALBEF(config)
    batch = make_batch(config, batch_size=4, length=12)
    batch["attention_mask"].fill_(1)  # no padding: the padded kernels then do exactly the counted work
    if swap:  # the data side's word-swapped captions (any other tokens cost the same)
        batch |= {"swap_input_ids": batch["input_ids"].flip(0), "swap_attention_mask": batch["attention_mask"],
                  "swap_valid": torch.ones(4, dtype=torch.bool)}
    masked_fraction = (batch["mlm_labels"] != -100).float().mean().item()
    size, rel = len(batch["input_ids"]), 1e-9
    # ITC's similarity matrices, which the formula leaves out: 2 directions of [B, E] x [E, B] per batch, and
    # as many for the teacher's targets (no queue here).
    itc_similarities = 2 * 2 * size * config.embed_dim * (2 if config.momentum_distillation else 1)
    itc_similarities += 2 * size * config.embed_dim if swap else 0  # each image against the swapped captions

    counted, outside_modules = _forward_flops_by_component(model, batch)
    formula = forward_flops_by_component(config, 12, masked_fraction, swap)
    assert outside_modules == itc_similarities  # nothing but ITC runs outside the modules sorted above
    assert counted.keys() == formula.keys()
    for name, flops in formula.items():
        assert counted[name] == pytest.approx(flops, rel=rel), name
    total = sum(formula.values())
    assert min(formula.values()) > 1000 * rel * total  # so leaving out any one term fails

    # Forward + backward: twice the forward, except the patch embedding or the conv stem's first conv (the
    # pixels need no gradient) and the
    # teacher (no gradient at all). The similarities' backward: to both sides, or with distillation to the
    # online side only (the keys are the teacher's), and none for the teacher's own.
    backward_similarities = itc_similarities / 2 if config.momentum_distillation else 2 * itc_similarities
    counted_train = sum(_counted_flops(model, batch).values()) - itc_similarities - backward_similarities
    predicted = train_flops_per_sample(config, 12, masked_fraction, swap)
    assert counted_train == pytest.approx(predicted, rel=rel)
    assert sum(train_flops_by_component(config, 12, masked_fraction, swap).values()) == predicted


def test_padding_costs_no_projection_flops():
    """Captions of 7 real tokens padded to 12 cost the projections / FFNs / heads of 7 tokens, exactly."""
    config = tiny_config(attention="eager")
    torch.manual_seed(0)
    model = ALBEF(config)
    padded = make_batch(config, batch_size=4, length=12)
    padded["attention_mask"] = (torch.arange(12) < 7).long().expand(4, -1).clone()
    padded["mlm_labels"][:, 7:] = -100
    short = {k: v[:, :7] if k != "image_ids" and torch.is_tensor(v) and v.dim() == 2 else v for k, v in padded.items()}
    torch.manual_seed(0)
    counted_padded = _counted_flops(model, padded)
    torch.manual_seed(0)
    counted_short = _counted_flops(model, short)
    linear = ("aten.mm", "aten.addmm")
    assert sum(counted_padded[op] for op in linear) == sum(counted_short[op] for op in linear)
    # Only the padded attention kernels (batched matmuls here) see the padding.
    assert counted_padded["aten.bmm"] > counted_short["aten.bmm"]


def test_the_multimodal_lms_encoder_side_flops_match_the_flop_counter():
    """The ViT on an image, and an instruction of 9 tokens read by the text encoder and fused with it (the
    multimodal LM's fused token), cost what encoder_forward_flops says, exactly."""
    config = tiny_config(attention="eager")
    torch.manual_seed(0)
    fusion = QuestionFusion(config, nn.Identity())
    image, ids = VisionTransformer(config, "eager"), torch.randint(5, config.vocab_size, (2, 9))
    with FlopCounterMode(display=False) as vision_only, torch.no_grad():
        states = image(make_batch(config, batch_size=2)["pixel_values"])
    with FlopCounterMode(display=False) as fused, torch.no_grad():
        fusion(states, ids, torch.ones_like(ids))
    assert vision_only.get_total_flops() / 2 == encoder_forward_flops(config)
    assert (vision_only.get_total_flops() + fused.get_total_flops()) / 2 == encoder_forward_flops(config, 9)


def _assert_normal(values: torch.Tensor, std: float, name: str) -> None:
    """Mean 0 and standard deviation `std`, each within 6 standard errors of its estimate (seeded: no flakes)."""
    n = values.numel()
    assert abs(values.mean().item()) < 6 * std / n**0.5, name
    assert values.std().item() == pytest.approx(std, rel=6 / (2 * (n - 1)) ** 0.5), name


def test_init_weights_per_module_restores_every_parameter():
    """What a ZeRO-3 trainer does: re-run `init_weights` module by module over parameters it wiped. Every
    parameter gets its rule back: N(0, init_std) for the weights of linear, convolution and embedding layers
    and for ViT's [CLS] and positions; zero biases; LayerNorm 1 and 0; the temperature its initial value."""
    torch.manual_seed(0)
    model = ALBEF(tiny_config())
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(123.0)
    for module in model.modules():
        model.init_weights(module)
    config, checked = model.config, set()
    for module_name, module in model.named_modules():
        for short, p in module.named_parameters(recurse=False):
            name = f"{module_name}.{short}".lstrip(".")
            if isinstance(module, nn.LayerNorm):
                assert p.eq(1.0 if short == "weight" else 0.0).all(), name
            elif short == "bias":
                assert p.eq(0).all(), name
            elif name == "temp":
                assert p.item() == pytest.approx(config.temperature_init)
            else:
                assert isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding, VisionTransformer)), name
                _assert_normal(p.detach(), config.init_std, name)
            checked.add(name)
    assert checked == {name for name, _ in model.named_parameters(remove_duplicate=False)}
