"""PEFT methods on the model library: what each leaves trainable, that the base weights stay bit-identical under
training, that a zero-initialised adapter is exactly the base model, that merged LoRA equals unmerged, and that
prefixes attend alike in every attention backend (flash-attn's varlen path against a reference kernel)."""

import hashlib
import importlib
import sys
import types

import pytest
import torch

from pretrain.model import KeyPadding, attention, packed_self_attention
from pretrain.model.peft import PeftConfig, PeftConfigError, apply_peft, matching_modules, merge_lora
from pretrain.model.vqa import ALBEFForVQA
from tests.helpers.model import make_batch, tiny_config

METHODS = ("none", "lora", "adapter", "prefix")


def vqa_model(seed: int = 0, answers: int = 5, **overrides) -> ALBEFForVQA:
    torch.manual_seed(seed)
    return ALBEFForVQA(tiny_config(**overrides), answers)


def vqa_batch(config, answers: int = 5, seed: int = 0) -> dict:
    batch = make_batch(config, seed=seed)
    g = torch.Generator().manual_seed(seed)
    batch["answer_scores"] = (torch.randint(0, 4, (len(batch["input_ids"]), answers), generator=g) / 3).clamp(max=1)
    return batch


def digest(tensors: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode() + tensors[name].detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def base_weights(model) -> dict:
    """The frozen pretrained weights under their original names (peft wrappers renamed some)."""
    out = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            out[name.replace(".base_layer", "").replace(".base.", ".")] = param
    return out


@pytest.mark.parametrize("method", METHODS[1:])
def test_training_steps_change_only_the_methods_weights(method):
    model = vqa_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_peft(model, PeftConfig(method=method), trained=ALBEFForVQA.TASK_HEAD)
    frozen = base_weights(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith("answer_head.") or any(k in n for k in ("lora_", ".prefix.", ".down.", ".up."))
               for n in trainable)
    assert {n for n in trainable if n.startswith("answer_head.")} == {n for n in before if n.startswith("answer_head.")}
    frozen_digest = digest(frozen)
    assert frozen_digest == digest({n: before[n] for n in frozen})  # the wrappers hold the very weights
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for step in range(3):
        optimizer.zero_grad()
        model(vqa_batch(model.config, seed=step)).loss.backward()
        optimizer.step()
    assert digest(base_weights(model)) == frozen_digest
    head = model.answer_head[0].weight
    assert not torch.equal(head, before["answer_head.0.weight"])  # training did train


def test_a_zero_initialised_adapter_is_exactly_the_base_model():
    model = vqa_model().eval()
    batch = vqa_batch(model.config)
    base = model.answer_logits(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    names = apply_peft(model, PeftConfig(method="adapter"), trained=ALBEFForVQA.TASK_HEAD)
    assert len(names) == 4 * 2 + 2 * 2 + 2 * 3  # ViT attn.out+fc2, text self_attn.out+ffn_out, fusion + cross out
    adapted = model.answer_logits(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    assert torch.equal(adapted, base)


def test_merged_lora_gives_the_unmerged_outputs():
    model = vqa_model().double().eval()
    apply_peft(model, PeftConfig(method="lora", rank=4, alpha=8), trained=ALBEFForVQA.TASK_HEAD)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LoRA's B starts at zero: give the update a value so the merge has something to fold
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=g, dtype=param.dtype))
    batch = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
             for k, v in vqa_batch(model.config).items()}
    args = (batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    unmerged = model.answer_logits(*args)
    merged_model = merge_lora(model)
    assert not any("lora_" in n for n, _ in merged_model.named_parameters())
    merged = merged_model.answer_logits(*args)
    torch.testing.assert_close(merged, unmerged, rtol=1e-10, atol=1e-10)
    base = vqa_model().double().eval().answer_logits(*args)
    assert not torch.allclose(base, unmerged)  # the update did change the function


@pytest.mark.parametrize("config, message", [
    (PeftConfig(method="lora", targets=r".*nothing_here"), "peft.targets '.*nothing_here' matches no Linear module "
     "for lora: module names look like image_encoder.blocks.0.attn.qkv or fusion_encoder.layers.0.cross_attn.query; "
     "fix the pattern"),
    (PeftConfig(method="lora", rank=0), "peft.rank is 0: it must be a positive integer"),
    (PeftConfig(method="adapter", adapter_size=-2), "peft.adapter_size is -2: it must be a positive integer"),
    (PeftConfig(method="bitfit"), "peft.method 'bitfit' is unknown; use one of none, lora, adapter, prefix"),
])
def test_unusable_configurations_are_one_clear_error(config, message):
    with pytest.raises(PeftConfigError) as err:
        matching_modules(vqa_model(), config)
    assert str(err.value) == message


def _prefix(heads=2, dim=8, length=3, seed=5):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(length, heads, dim, generator=g, dtype=torch.float64) for _ in range(2))


def _reference(q, k, v, mask, prefix):
    """Attention written out: scores over [prefix keys, real keys], softmax, weighted values."""
    pk, pv = (p.expand(len(q), -1, -1, -1) for p in prefix)
    keys, values = torch.cat([pk, k], 1), torch.cat([pv, v], 1)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, keys) / q.shape[-1] ** 0.5
    full = torch.cat([torch.ones(len(q), pk.shape[1], dtype=torch.bool), mask], 1)
    scores = scores.masked_fill(~full[:, None, None, :], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), values)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_prefixes_attend_alike_in_every_padded_backend(backend):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 7, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    padding = KeyPadding(torch.arange(7)[None, :] < torch.tensor([7, 4, 1])[:, None])
    prefix = _prefix()
    expected = _reference(q, k, v, padding.mask, prefix)
    out = attention(q, k, v, backend=backend, key_padding=padding, prefix=prefix)
    real = padding.mask[:, :, None, None]
    torch.testing.assert_close(out * real, expected * real, rtol=1e-12, atol=1e-12)
    qkv = torch.stack([q, k, v], dim=2)
    packed = packed_self_attention(padding.unpad(qkv), backend=backend, text=padding, prefix=prefix)
    torch.testing.assert_close(packed, padding.unpad(expected), rtol=1e-12, atol=1e-12)
    dense = attention(q, k, v, backend=backend, prefix=prefix)  # the ViT: no padding
    torch.testing.assert_close(dense, _reference(q, k, v, torch.ones(3, 7, dtype=torch.bool), prefix),
                               rtol=1e-12, atol=1e-12)


def _varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0):
    """flash-attn's varlen contract in plain torch: sequence i is q[cu_q[i]:cu_q[i+1]] against its keys."""
    out = torch.empty_like(q)
    for i in range(len(cu_q) - 1):
        qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        scores = torch.einsum("qhd,khd->hqk", q[qs], k[ks]) / q.shape[-1] ** 0.5
        out[qs] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[ks])
    return out


def test_the_flash_attn_varlen_path_gets_the_prefixes_in_front_of_each_sequence(monkeypatch):
    """No flash-attn here: its varlen kernel is replaced by a reference of its contract, so what is checked is
    the unpadding and cu_seqlens our code hands it with prefixes (on GPU the kernel itself is flash-attn's)."""
    fake = types.SimpleNamespace(flash_attn_varlen_func=_varlen_reference,
                                 flash_attn_func=lambda *a, **k: pytest.fail("dense kernel used with padding"))
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    monkeypatch.setattr(importlib.import_module("pretrain.model.attention"), "_resolve", lambda backend, q: backend)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 7, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    padding = KeyPadding(torch.arange(7)[None, :] < torch.tensor([7, 4, 1])[:, None])
    prefix = _prefix()
    qkv = torch.stack([q, k, v], dim=2)
    packed = packed_self_attention(padding.unpad(qkv), backend="flash_attn", text=padding, prefix=prefix)
    torch.testing.assert_close(packed, padding.unpad(_reference(q, k, v, padding.mask, prefix)),
                               rtol=1e-12, atol=1e-12)
