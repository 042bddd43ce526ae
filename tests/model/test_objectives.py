import math

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from pretrain.model.objectives import (
    ITCResult,
    caption_words_loss,
    itc_loss,
    itm_loss,
    mlm_loss,
    sample_itm_negatives,
)
from tests.helpers.ranks import average_over_ranks, run_on_ranks


def _itc_on(sim: torch.Tensor, image_ids: torch.Tensor) -> ITCResult:
    """ITC whose similarity matrix is exactly `sim` (temperature 1): identity image features, text rows sim.T."""
    return itc_loss(torch.eye(len(sim), dtype=sim.dtype), sim.T.contiguous(), image_ids, torch.ones(1, dtype=sim.dtype))


def _negatives(sim: torch.Tensor, image_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return sample_itm_negatives(_itc_on(sim, image_ids))


def test_itc_with_duplicate_image_ids_matches_hand_computation():
    # Images 0 and 1 are the same picture (id 7); text 0 and 1 are both its captions.
    sim = torch.tensor([[2.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 3.0]], dtype=torch.float64)
    lse = [math.log(math.exp(2) + math.exp(1) + 1), math.log(math.exp(2) + math.exp(1) + 1), math.log(2 + math.exp(3))]
    row0 = -(0.5 * (2 - lse[0]) + 0.5 * (1 - lse[0]))
    row1 = -(0.5 * (1 - lse[1]) + 0.5 * (2 - lse[1]))
    row2 = -(3 - lse[2])
    expected = (row0 + row1 + row2) / 3  # sim is symmetric, so both directions agree
    assert _itc_on(sim, torch.tensor([7, 7, 8])).loss.item() == pytest.approx(expected, rel=1e-12)
    # with one-hot targets the second caption would be a negative: the loss differs
    assert _itc_on(sim, torch.tensor([7, 8, 9])).loss.item() != pytest.approx(expected, rel=1e-3)


def test_itc_similarities_positives_and_statistics_from_image_ids():
    g = torch.Generator().manual_seed(0)
    feat = F.normalize(torch.randn(4, 8, generator=g, dtype=torch.float64), dim=-1)
    itc = itc_loss(feat, feat, torch.tensor([3, 3, 5, 6]), torch.tensor([0.5], dtype=torch.float64))
    cosine = feat @ feat.T
    torch.testing.assert_close(itc.sim_i2t, cosine / 0.5, rtol=0, atol=1e-12)  # float64: rounding only
    assert itc.positives.sum().item() == 6 and itc.positives[0, 1] and not itc.positives[0, 2]
    positives = itc.positives
    assert itc.positive_sim.item() == pytest.approx(cosine[positives].mean().item(), abs=1e-12)
    assert itc.negative_sim.item() == pytest.approx(cosine[~positives].mean().item(), abs=1e-12)


def test_itc_similarities_of_bf16_features_are_not_rounded_to_bf16():
    # A bf16 logit of magnitude ~14 moves in steps of 0.0625: the similarity matmul must run in fp32.
    g = torch.Generator().manual_seed(0)
    feat = F.normalize(torch.randn(16, 32, generator=g), dim=-1).bfloat16()
    itc = itc_loss(feat, feat, torch.arange(16), torch.tensor([0.07], dtype=torch.bfloat16))
    assert itc.sim_i2t.dtype == torch.float32
    exact = (feat.double() @ feat.double().T) / torch.tensor([0.07], dtype=torch.bfloat16).double()
    assert (itc.sim_i2t.double() - exact).abs().max().item() < 1e-4  # bf16 logits are off by up to ~3e-2


def test_itm_sampling_never_picks_a_same_image_negative():
    torch.manual_seed(0)  # the draws (multinomial takes the global generator)
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])
    positives = ids[:, None] == ids[None, :]
    sim = torch.randn(8, 8, generator=torch.Generator().manual_seed(0)) + 20 * positives  # the mask must act
    picks_text, picks_image = zip(*(_negatives(sim, ids) for _ in range(500)))
    picks_text, picks_image = torch.stack(picks_text), torch.stack(picks_image)
    assert (ids[picks_text] != ids[None, :]).all() and (ids[picks_image] != ids[None, :]).all()
    # every valid negative of row 0 gets drawn sometimes
    assert set(picks_text[:, 0].tolist()) == {2, 3, 4, 5, 6, 7}


def test_itm_sampling_survives_non_finite_similarities():
    # a NaN batch on one rank reaches every rank's similarities through the ITC gather; sampling must not
    # crash (the step's loss is NaN and DeepSpeed skips the update)
    torch.manual_seed(0)  # the draws (multinomial takes the global generator)
    ids = torch.tensor([0, 0, 1, 2])
    sim = torch.full((4, 4), float("nan"))
    sim[3, 0] = float("inf")
    neg_text, neg_image = _negatives(sim, ids)
    assert (ids[neg_text] != ids).all() and (ids[neg_image] != ids).all()


def test_itm_sampling_follows_the_dominant_similarity():
    torch.manual_seed(0)  # the draws (multinomial takes the global generator)
    sim = torch.zeros(6, 6)
    sim[:, 4] = 8.0  # text 4 looks like every image
    sim[4, 2] = 8.0  # image 4's hardest negative is text 2
    neg_text = torch.stack([_negatives(sim, torch.arange(6))[0] for _ in range(300)])
    others = torch.tensor([0, 1, 2, 3, 5])
    assert (neg_text[:, others] == 4).float().mean() > 0.95
    assert (neg_text[:, 4] == 2).float().mean() > 0.95


def test_itm_negative_hardness_scales_the_sampling_logits():
    # sim 3 vs 0: at hardness 1 the hard negative wins e^3/(e^3 + 4) = 0.834 of the draws, at 1/3 e/(e + 4)
    # = 0.405, at 0 a fifth (uniform over the 5 other images)
    sim = torch.zeros(6, 6)
    sim[:, 4] = 3.0
    for hardness, share in ((1.0, math.exp(3) / (math.exp(3) + 4)), (1 / 3, math.e / (math.e + 4)), (0.0, 0.2)):
        torch.manual_seed(0)  # the draws (multinomial takes the global generator)
        itc = _itc_on(sim, torch.arange(6))
        neg_text = torch.stack([sample_itm_negatives(itc, hardness)[0] for _ in range(2000)])
        assert (neg_text[:, :4] == 4).float().mean().item() == pytest.approx(share, abs=0.02), hardness


def test_itm_sampling_with_a_single_image_draws_uniformly():
    # Every caption shows the same image: no negative exists, and the similarities must not steer the draw
    # (by similarity, text 0 would win 300 of 300 draws).
    torch.manual_seed(0)  # the draws (multinomial takes the global generator)
    sim = torch.zeros(3, 3)
    sim[:, 0] = 10.0
    draws = torch.stack([torch.cat(_negatives(sim, torch.zeros(3, dtype=torch.long))) for _ in range(600)])
    counts = torch.bincount(draws.flatten(), minlength=3).double()
    expected = draws.numel() / 3
    chi_square = ((counts - expected) ** 2 / expected).sum().item()
    assert chi_square < 13.8  # the 0.999 quantile of chi-square with 2 degrees of freedom


class _FunctionCalls(TorchFunctionMode):
    """Every torch function and Tensor method called, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append(func)
        return func(*args, **(kwargs or {}))


class _HostSyncs(TorchDispatchMode):
    """The aten ops that make the host wait for the device: reading a value back, or an output whose size
    depends on the values (nonzero, masked_select, boolean-mask indexing)."""

    _SIZE_FROM_VALUES = {torch.ops.aten.nonzero.default, torch.ops.aten.masked_select.default}

    def __init__(self) -> None:
        super().__init__()
        self.ops: list = []
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        indices = args[1] if func.name().startswith("aten::index") and len(args) > 1 else ()
        boolean_mask = any(t is not None and t.dtype == torch.bool for t in indices)
        if func is torch.ops.aten._local_scalar_dense.default or func in self._SIZE_FROM_VALUES or boolean_mask:
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


_HOST_READS = (torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__bool__,
               torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__)  # fmt: skip


@pytest.mark.parametrize("image_ids", [[0, 0, 1, 2, 3, 3], [5] * 6], ids=["negatives", "single_image"])
def test_itm_sampling_is_one_multinomial_call_and_no_host_sync(image_ids):
    """Both directions in one draw, and nothing the host has to wait for (on a GPU each would stall the step);
    the single-image fallback included. On CPU nothing syncs, so the ops that would are recorded instead."""
    sim = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    itc = _itc_on(sim, torch.tensor(image_ids))
    with _FunctionCalls() as functions, _HostSyncs() as dispatched:
        negative_texts, negative_images = sample_itm_negatives(itc)
    assert negative_texts.shape == negative_images.shape == (6,)
    multinomial = (torch.multinomial, torch.Tensor.multinomial)
    assert sum(f in multinomial for f in functions.calls) == 1
    assert dispatched.ops.count(torch.ops.aten.multinomial.default) == 1
    assert [f.__name__ for f in functions.calls if f in _HOST_READS] == []
    assert dispatched.syncs == []


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_itm_sampling_does_not_synchronise_a_cuda_device():
    sim = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    itc = ITCResult(*(t.cuda() for t in _itc_on(sim, torch.tensor([0, 0, 1, 2, 3, 3]))))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sample_itm_negatives(itc)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_itm_loss_and_accuracy_on_known_logits():
    head = torch.nn.Identity()  # the fused [CLS] states are the logits themselves
    f64 = dict(dtype=torch.float64)
    positive = torch.tensor([[[0.0, 2.0]], [[1.0, 0.0]]], **f64)  # right, wrong
    negative_text = torch.tensor([[[3.0, 0.0]], [[3.0, 0.0]]], **f64)  # right, right
    negative_image = torch.tensor([[[0.0, 1.0]], [[2.0, 0.0]]], **f64)  # wrong, right
    loss, accuracy = itm_loss(head, positive, negative_text, negative_image)
    logits = torch.tensor([[0.0, 2.0], [1.0, 0.0], [3.0, 0.0], [3.0, 0.0], [0.0, 1.0], [2.0, 0.0]], **f64)
    labels = torch.tensor([1, 1, 0, 0, 0, 0])
    assert loss.item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-12)
    assert accuracy.item() == pytest.approx(4 / 6)


def test_mlm_loss_ignores_unmasked_positions():
    states = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.full((2, 5), -100)
    labels[0, 1], labels[1, 3] = 4, 7
    head = torch.nn.Identity()
    loss, _ = mlm_loss(head, states, labels)
    changed = states.clone()
    changed[0, 0] += 100
    changed[1, 4] -= 50
    assert mlm_loss(head, changed, labels)[0].item() == loss.item()
    expected = (F.cross_entropy(states[0, 1], torch.tensor(4)) + F.cross_entropy(states[1, 3], torch.tensor(7))) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)


def test_mlm_loss_perfect_logits_and_no_masked_tokens():
    labels = torch.tensor([[-100, 3, -100, 9]])
    perfect = torch.full((1, 4, 12), -30.0)
    perfect[0, 1, 3] = perfect[0, 3, 9] = 30.0
    loss, accuracy = mlm_loss(torch.nn.Identity(), perfect, labels)
    assert loss.item() < 1e-6 and accuracy.item() == 1.0
    states = torch.randn(1, 4, 12, generator=torch.Generator().manual_seed(0), requires_grad=True)
    empty, empty_accuracy = mlm_loss(torch.nn.Identity(), states, torch.full((1, 4), -100))
    assert empty.item() == 0.0 and empty_accuracy.item() == 0.0


def test_mlm_accuracy_counts_the_masked_tokens_predicted_right():
    labels = torch.tensor([[-100, 3, 5, 9], [2, -100, -100, 7]])
    logits = torch.zeros(2, 4, 12)
    for (row, col), token in {(0, 1): 3, (0, 2): 6, (0, 3): 9, (1, 0): 1, (1, 3): 7, (0, 0): 4}.items():
        logits[row, col, token] = 5.0  # right at (0,1), (0,3), (1,3); wrong at (0,2), (1,0); (0,0) is not masked
    _, accuracy = mlm_loss(torch.nn.Identity(), logits, labels)
    assert accuracy.item() == pytest.approx(3 / 5)


def test_caption_words_loss_is_cross_entropy_against_each_captions_word_set():
    """Per caption: minus the mean log-probability of its distinct words; [CLS], [SEP] and padding excluded,
    a repeated word counted once."""
    logits = torch.randn(2, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    input_ids = torch.tensor([[2, 7, 5, 7, 3, 0], [2, 6, 3, 0, 0, 0]])  # [CLS] words [SEP] [PAD]...
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
    logp = F.log_softmax(logits, dim=1)
    expected = (-(logp[0, 7] + logp[0, 5]) / 2 - logp[1, 6]) / 2
    assert caption_words_loss(logits, input_ids, mask).item() == pytest.approx(expected.item(), rel=1e-12)


def test_caption_words_loss_falls_as_the_logits_favour_the_captions_words():
    input_ids, mask = torch.tensor([[2, 4, 8, 3]]), torch.ones(1, 4, dtype=torch.long)
    logits = torch.zeros(1, 10, requires_grad=True)
    loss = caption_words_loss(logits, input_ids, mask)
    assert loss.item() == pytest.approx(math.log(10))
    loss.backward()
    # the gradient raises exactly the two words (and, the softmax being shared, lowers every other token)
    assert (logits.grad[0, [4, 8]] < 0).all() and (logits.grad[0, [0, 1, 2, 3, 5, 6, 7, 9]] > 0).all()


def test_mlm_distillation_mixes_the_teacher_distribution_into_the_target():
    """(1 - alpha) * cross-entropy with the token + alpha * cross-entropy with the teacher's distribution,
    averaged over the masked tokens (ALBEF's MLM distillation); alpha 0 is plain MLM exactly."""
    g = torch.Generator().manual_seed(0)
    states = torch.randn(2, 5, 11, generator=g, dtype=torch.float64)
    labels = torch.full((2, 5), -100)
    labels[0, 1], labels[1, 3], labels[1, 4] = 4, 7, 2
    teacher = torch.randn(3, 11, generator=g, dtype=torch.float64).softmax(dim=1)
    plain, _ = mlm_loss(torch.nn.Identity(), states, labels)
    assert mlm_loss(torch.nn.Identity(), states, labels, teacher, 0.0)[0].item() == plain.item()
    masked = states[labels != -100]
    soft = -(masked.log_softmax(dim=1) * teacher).sum(dim=1).mean()
    distilled, _ = mlm_loss(torch.nn.Identity(), states, labels, teacher, 0.4)
    assert distilled.item() == pytest.approx((0.6 * plain + 0.4 * soft).item(), rel=1e-12)
    assert abs(soft.item() - plain.item()) > 0.1  # so the mix is seen


# ---- ITC across 2 ranks over gloo equals 1 process on the whole batch --------------------------------


def _itc_case(rank: int, world: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A tiny projection + temperature on fixed inputs, in float64; the rank's loss and gradients, averaged
    over ranks as a data-parallel engine does."""
    g = torch.Generator().manual_seed(0)
    images, texts = (torch.randn(8, 6, generator=g, dtype=torch.float64) for _ in range(2))
    image_proj, text_proj = torch.nn.Linear(6, 4).double(), torch.nn.Linear(6, 4).double()
    for p in [*image_proj.parameters(), *text_proj.parameters()]:
        torch.nn.init.normal_(p, generator=g)
    temperature = torch.nn.Parameter(torch.tensor([0.1], dtype=torch.float64))
    image_ids = torch.tensor([0, 1, 1, 2, 3, 3, 4, 1])  # duplicates inside and across the two halves
    rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
    image_feat = F.normalize(image_proj(images[rows]), dim=-1)
    text_feat = F.normalize(text_proj(texts[rows]), dim=-1)
    loss = itc_loss(image_feat, text_feat, image_ids[rows], temperature).loss
    loss.backward()
    results = [loss.detach(), *(p.grad for p in [*image_proj.parameters(), *text_proj.parameters(), temperature])]
    return average_over_ranks(results) if world > 1 else results


@pytest.mark.slow
def test_itc_two_ranks_equal_one_process(tmp_path):
    results = run_on_ranks(_itc_case, store=tmp_path / "store")
    reference = _itc_case(0, 1)
    assert reference[-1].abs().item() > 0
    for rank in (0, 1):
        for ours, expected in zip(results[rank], reference):
            torch.testing.assert_close(ours, expected, atol=1e-12, rtol=1e-12)
