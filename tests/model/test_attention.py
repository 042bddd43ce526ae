import pytest
import torch

from pretrain.model import KeyPadding, attention, packed_cross_attention, packed_self_attention
from pretrain.model.attention import FLASH_ATTN_INSTALLED, _auto_backend


def _qkv(batch=3, lq=7, lk=7, heads=2, dim=8, seed=0, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    shape = lambda length: (batch, length, heads, dim)  # noqa: E731
    return [torch.randn(shape(n), generator=g, dtype=dtype).to(device).requires_grad_() for n in (lq, lk, lk)]


def _padding(batch, length, lengths):
    return KeyPadding(torch.arange(length)[None, :] < torch.tensor(lengths)[:, None])


def _run(backend, q, k, v, padding, valid_queries):
    out = attention(q, k, v, backend=backend, key_padding=padding)
    # Padded query rows are don't-care; the loss (and so the gradients) only sees the real ones.
    loss = (out * valid_queries[:, :, None, None]).pow(2).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    return out * valid_queries[:, :, None, None], grads


@pytest.mark.parametrize("kind", ["self", "cross"])
def test_sdpa_equals_eager_with_padding(kind):
    lengths = [7, 4, 1]
    if kind == "self":
        q, k, v = _qkv()
        padding = _padding(3, 7, lengths)
        valid = padding.mask.double()
    else:  # text queries (padded) against image keys (no padding)
        q, k, v = _qkv(lq=7, lk=10)
        padding, valid = None, _padding(3, 7, lengths).mask.double()
    eager_out, eager_grads = _run("eager", q, k, v, padding, valid)
    sdpa_out, sdpa_grads = _run("sdpa", q, k, v, padding, valid)
    torch.testing.assert_close(sdpa_out, eager_out)
    for ours, reference in zip(sdpa_grads, eager_grads):
        torch.testing.assert_close(ours, reference)
    if kind == "self":  # padded keys get no gradient: nobody attended to them
        assert eager_grads[1][1, 4:].abs().max() == 0 and eager_grads[1][0].abs().max() > 0


def test_padding_changes_the_output():
    q, k, v = _qkv()
    padded = attention(q, k, v, backend="eager", key_padding=_padding(3, 7, [7, 4, 1]))
    full = attention(q, k, v, backend="eager")
    torch.testing.assert_close(padded[0], full[0])
    assert (padded[1] - full[1]).abs().max() > 1e-3
    # one real key: every query returns exactly that key's value
    torch.testing.assert_close(padded[2], v[2, :1].expand(7, -1, -1))


@pytest.mark.parametrize(("dtype", "expected"), [(torch.float32, "sdpa"), (torch.bfloat16, "eager")])
def test_auto_picks_per_dtype_on_cpu_and_logs_it(dtype, expected, caplog):
    _auto_backend.cache_clear()
    q, k, v = (t.detach().to(dtype) for t in _qkv())
    with caplog.at_level("INFO", logger="pretrain.model.attention"):
        out = attention(q, k, v, backend="auto")
    assert f"attention backend auto -> {expected} for cpu {dtype}" in caplog.text
    assert torch.equal(out, attention(q, k, v, backend=expected))


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and FLASH_ATTN_INSTALLED), reason="needs CUDA and flash-attn")
@pytest.mark.parametrize("kind", ["self", "cross"])
def test_flash_attn_varlen_equals_eager(kind):
    lengths = [7, 4, 1]
    lk = 7 if kind == "self" else 10
    q, k, v = _qkv(lk=lk, dim=32, dtype=torch.bfloat16, device="cuda")
    padding = _padding(3, 7, lengths) if kind == "self" else None
    if padding is not None:
        padding = KeyPadding(padding.mask.cuda())
    valid = _padding(3, 7, lengths).mask.cuda().to(torch.bfloat16)
    flash_out, flash_grads = _run("flash_attn", q, k, v, padding, valid)
    eager_out, eager_grads = _run("eager", *(t.float().detach().requires_grad_() for t in (q, k, v)), padding,
                                  valid.float())  # fmt: skip
    torch.testing.assert_close(flash_out.float(), eager_out, atol=2e-2, rtol=2e-2)
    for ours, reference in zip(flash_grads, eager_grads):
        torch.testing.assert_close(ours.float(), reference, atol=5e-2, rtol=5e-2)


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and FLASH_ATTN_INSTALLED), reason="needs CUDA and flash-attn")
def test_flash_attn_takes_packed_text_directly():
    """The model's path: packed text self-attention, and packed text streams (two per image) cross-attending."""
    text = KeyPadding(_padding(4, 7, [7, 4, 1, 5]).mask.cuda())
    q, k, v = (t.detach() for t in _qkv(batch=4, dim=32, dtype=torch.bfloat16, device="cuda"))
    flash = packed_self_attention(text.unpad(torch.stack([q, k, v], dim=2)), backend="flash_attn", text=text)
    reference = attention(q.float(), k.float(), v.float(), backend="eager", key_padding=text)
    torch.testing.assert_close(flash.float(), text.unpad(reference), atol=2e-2, rtol=2e-2)

    per_image = text.grouped(2)
    images = torch.randn(2, 10, 2, 32, generator=torch.Generator().manual_seed(1)).to("cuda", torch.bfloat16)
    flash = packed_cross_attention(text.unpad(q), images, images, backend="flash_attn", queries=per_image)
    reference = attention(per_image.pad(text.unpad(q)).float(), images.float(), images.float(), backend="eager")
    torch.testing.assert_close(flash.float(), per_image.unpad(reference), atol=2e-2, rtol=2e-2)
