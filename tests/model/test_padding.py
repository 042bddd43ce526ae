"""The text and fusion encoders compute on real tokens only: padding must change nothing, forward or backward."""

import pytest
import torch

from pretrain.model import ALBEF, KeyPadding
from tests.helpers.model import make_batch, tiny_config


def test_unpad_pad_round_trip_and_grouping():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]).bool()
    padding = KeyPadding(mask)
    x = torch.randn(4, 4, 3, generator=torch.Generator().manual_seed(0))
    packed = padding.unpad(x)
    assert packed.shape == (10, 3)
    assert torch.equal(packed[2:5], x[1, :3])  # copies: exact
    assert torch.equal(padding.pad(packed), x * mask[:, :, None])
    assert padding.cu_seqlens.tolist() == [0, 2, 5, 6, 10] and padding.max_seqlen == 4
    # Two streams per group: the same packed rows, one sequence per group.
    grouped = padding.grouped(2)
    assert torch.equal(grouped.indices, padding.indices)
    assert grouped.cu_seqlens.tolist() == [0, 5, 10] and grouped.max_seqlen == 5
    assert torch.equal(grouped.pad(packed), (x * mask[:, :, None]).reshape(2, 8, 3))


EXACT = dict(atol=1e-10, rtol=1e-10)  # float64: what is left is summation order (~1e-15 relative)


def _encode(model: ALBEF, ids: torch.Tensor, mask: torch.Tensor, image: torch.Tensor):
    padding = KeyPadding(mask.bool())
    text = model.text_encoder(ids, padding)
    return text, model.fusion_encoder(text, padding, image)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_padded_batch_equals_each_caption_alone(backend):
    """Six captions of 6-12 real tokens padded to 12, three streams per image, against each caption run
    alone at its own length (no padding anywhere): equal outputs on real tokens and equal gradients."""
    torch.manual_seed(0)
    model = ALBEF(tiny_config(attention=backend)).double()
    batch = make_batch(model.config, batch_size=6, length=12)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ids = torch.where(mask.bool(), ids, 7)  # junk at padding positions must not matter either
    lengths = mask.sum(dim=1).tolist()
    assert min(lengths) < 12
    g = torch.Generator().manual_seed(1)
    image = torch.randn(2, 5, model.config.vision_hidden, generator=g, dtype=torch.float64, requires_grad=True)
    text_weights = torch.randn(6, 12, model.config.text_hidden, generator=g, dtype=torch.float64)
    fused_weights = torch.randn(6, 12, model.config.text_hidden, generator=g, dtype=torch.float64)

    def grads(loss):
        params = [image, *model.parameters()]
        return torch.autograd.grad(loss, params, allow_unused=True)

    text, fused = _encode(model, ids, mask, image)
    assert text[~mask.bool()].abs().max() == 0 and fused[~mask.bool()].abs().max() == 0
    batched_grads = grads((text * text_weights).sum() + (fused * fused_weights).sum())

    alone_loss = 0
    for i, n in enumerate(lengths):
        text_i, fused_i = _encode(model, ids[i : i + 1, :n], mask[i : i + 1, :n], image[i // 3 : i // 3 + 1])
        torch.testing.assert_close(text[i, :n], text_i[0], **EXACT)
        torch.testing.assert_close(fused[i, :n], fused_i[0], **EXACT)
        alone_loss = alone_loss + (text_i[0] * text_weights[i, :n]).sum() + (fused_i[0] * fused_weights[i, :n]).sum()
    for batched, alone in zip(batched_grads, grads(alone_loss)):
        if alone is None:  # token-type row 1 and the heads: not part of the encoders
            assert batched is None
            continue
        torch.testing.assert_close(batched, alone, **EXACT)
