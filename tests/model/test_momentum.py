"""Momentum distillation: the feature queue, distilled ITC against hand references, the EMA teacher (exact,
also on ZeRO-3 partitions across 2 ranks), and the off switch reproducing the forward from before it."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pretrain.model import ALBEF, FeatureQueue, QueuedFeatures, itc_distill_loss, itc_loss
from pretrain.train.optim import parameter_groups
from tests.helpers.model import make_batch, tiny_config
from tests.helpers.ranks import run_on_ranks, start_deepspeed


def _rows(n: int, start: int, dim: int = 2) -> torch.Tensor:
    return torch.arange(start, start + n, dtype=torch.float32)[:, None].expand(n, dim).clone()


def test_queue_overwrites_the_oldest_entries_in_order_and_wraps_around():
    queue = FeatureQueue(size=5, dim=2)
    assert queue.image_ids.tolist() == [-1] * 5  # empty slots
    queue.enqueue(_rows(3, 0), -_rows(3, 0), torch.tensor([10, 11, 12]))
    assert queue.image_ids.tolist() == [10, 11, 12, -1, -1] and queue.position.item() == 3
    queue.enqueue(_rows(3, 3), -_rows(3, 3), torch.tensor([13, 14, 15]))  # wraps: slot 0 is the oldest
    assert queue.image_ids.tolist() == [15, 11, 12, 13, 14] and queue.position.item() == 1
    assert queue.image_feat[:, 0].tolist() == [5, 1, 2, 3, 4]
    assert queue.text_feat[:, 0].tolist() == [-5, -1, -2, -3, -4]
    queue.enqueue(_rows(7, 6), -_rows(7, 6), torch.arange(16, 23))  # more rows than slots: as if one by one
    assert queue.image_ids.tolist() == [20, 21, 22, 18, 19] and queue.position.item() == 3
    assert torch.equal(queue.image_feat[:, 0], queue.image_ids.float() - 10)


def _features(n: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def _case():
    """Online features of 3 pairs, teacher features, and a queue of 4 slots: one empty, one of image 7 (the
    batch's first image), two of other images."""
    image, text, teacher_image, teacher_text = (_features(3, seed) for seed in range(4))
    ids = torch.tensor([7, 8, 9])
    queue = QueuedFeatures(_features(4, 4), _features(4, 5), torch.tensor([7, 30, -1, 31]))
    return image, text, ids, torch.tensor([0.1], dtype=torch.float64), teacher_image, teacher_text, queue


def _plain_itc_with_queue_negatives(image, text, ids, temperature, teacher_image, teacher_text, queue):
    """InfoNCE of the online features against the teacher's keys and the filled queue slots, written out:
    cross-entropy over the keys with the target spread evenly over those of the same image."""
    filled = queue.image_ids >= 0
    text_keys = torch.cat([teacher_text, queue.text_feat[filled]])
    image_keys = torch.cat([teacher_image, queue.image_feat[filled]])
    key_ids = torch.cat([ids, queue.image_ids[filled]])
    targets = (ids[:, None] == key_ids[None, :]).double()
    targets /= targets.sum(dim=1, keepdim=True)
    i2t = F.cross_entropy(image @ text_keys.T / temperature, targets)
    t2i = F.cross_entropy(text @ image_keys.T / temperature, targets)
    return (i2t + t2i) / 2


def test_with_alpha_0_distilled_itc_is_plain_itc_with_queue_negatives():
    case = _case()
    ours = itc_distill_loss(*case, alpha=0.0)
    assert ours.loss.item() == pytest.approx(_plain_itc_with_queue_negatives(*case).item(), rel=1e-12)
    # the similarities handed to ITM's negative sampling cover the batch only
    assert ours.sim_i2t.shape == (3, 3) and ours.positives.tolist() == torch.eye(3, dtype=torch.bool).tolist()
    # alpha matters: the teacher's similarities enter the target
    assert abs(itc_distill_loss(*case, alpha=0.4).loss.item() - ours.loss.item()) > 1e-3


def test_a_queued_entry_of_the_same_image_is_a_positive():
    image, text, ids, temperature, teacher_image, teacher_text, queue = _case()
    ours = itc_distill_loss(image, text, ids, temperature, teacher_image, teacher_text, queue, alpha=0.0).loss
    # Row 0 (image 7) has two positives: its own pair and queue slot 0. Held as a negative instead (a
    # different id) the loss changes; written out with its target 1/2 + 1/2, it matches.
    other = QueuedFeatures(queue.image_feat, queue.text_feat, torch.tensor([99, 30, -1, 31]))
    as_negative = itc_distill_loss(image, text, ids, temperature, teacher_image, teacher_text, other, alpha=0.0).loss
    assert abs(as_negative.item() - ours.item()) > 1e-3
    keys = torch.cat([teacher_text, queue.text_feat[[0, 1, 3]]])
    logits = image[0] @ keys.T / temperature
    row0_i2t = -(0.5 * logits.log_softmax(0)[0] + 0.5 * logits.log_softmax(0)[3])
    reference = _plain_itc_with_queue_negatives(image, text, ids, temperature, teacher_image, teacher_text, queue)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-12)
    # and the reference's row 0 is that spread target (image-to-text half, row 0 of 3)
    i2t_rows = -(F.log_softmax(image @ keys.T / temperature, dim=1)
                 * torch.tensor([[0.5, 0, 0, 0.5, 0, 0], [0, 1.0, 0, 0, 0, 0], [0, 0, 1.0, 0, 0, 0]],
                                dtype=torch.float64)).sum(dim=1)
    assert i2t_rows[0].item() == pytest.approx(row0_i2t.item(), rel=1e-12)


def test_distilled_itc_target_is_the_mix_of_truth_and_the_teachers_softmax():
    image, text, ids, temperature, teacher_image, teacher_text, queue = _case()
    alpha = 0.4
    filled = queue.image_ids >= 0
    text_keys = torch.cat([teacher_text, queue.text_feat[filled]])
    image_keys = torch.cat([teacher_image, queue.image_feat[filled]])
    key_ids = torch.cat([ids, queue.image_ids[filled]])
    truth = (ids[:, None] == key_ids[None, :]).double()
    truth /= truth.sum(dim=1, keepdim=True)
    i2t = F.cross_entropy(image @ text_keys.T / temperature,
                          alpha * (teacher_image @ text_keys.T / temperature).softmax(1) + (1 - alpha) * truth)
    t2i = F.cross_entropy(text @ image_keys.T / temperature,
                          alpha * (teacher_text @ image_keys.T / temperature).softmax(1) + (1 - alpha) * truth)
    ours = itc_distill_loss(image, text, ids, temperature, teacher_image, teacher_text, queue, alpha=alpha)
    assert ours.loss.item() == pytest.approx(((i2t + t2i) / 2).item(), rel=1e-12)


def test_without_a_queue_and_with_the_online_features_as_keys_it_is_todays_itc_value():
    image, text, ids, temperature, *_ = _case()
    empty = QueuedFeatures(torch.zeros(0, 8, dtype=torch.float64), torch.zeros(0, 8, dtype=torch.float64),
                           torch.zeros(0, dtype=torch.long))
    ours = itc_distill_loss(image, text, ids, temperature, image, text, empty, alpha=0.0)
    assert ours.loss.item() == pytest.approx(itc_loss(image, text, ids, temperature).loss.item(), rel=1e-12)


# Today's forward (before momentum distillation existed), float64, seeded: main at 976d758 printed these.
TODAY = {"loss": 7.655792959117859, "loss_itc": 1.8575762306851504, "loss_itm": 0.7142383387642295,
         "loss_mlm": 5.083978389668479, "itc_positive_sim": -0.00893380759827137,
         "itc_negative_sim": -0.007088002199385364, "grad_norm": 11.4228572551156}


def test_momentum_distillation_off_reproduces_todays_losses_and_gradients():
    torch.manual_seed(0)
    model = ALBEF(tiny_config(attention="eager", momentum_distillation=False)).double()
    assert model.momentum is None and not any("momentum" in name for name, _ in model.named_parameters())
    batch = make_batch(model.config, batch_size=6)
    batch["pixel_values"] = batch["pixel_values"].double()
    torch.manual_seed(5)  # the ITM draws
    out = model(batch)
    out.loss.backward()
    grad_norm = sum(p.grad.pow(2).sum() for p in model.parameters()).sqrt()
    ours = {**{k: getattr(out, k).item() for k in TODAY if k != "grad_norm"}, "grad_norm": grad_norm.item()}
    for name, value in TODAY.items():  # float64: CPUs may differ by summation order alone (~1e-15)
        assert ours[name] == pytest.approx(value, rel=1e-12, abs=1e-15), name


def _teacher_and_online(model: ALBEF) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    return [(name, p, model.get_parameter(name)) for name, p in model.momentum.named_parameters()]


def test_the_teacher_starts_as_the_online_model_follows_it_by_ema_and_is_never_optimized():
    torch.manual_seed(0)
    model = ALBEF(tiny_config(momentum_distillation=True, queue_size=8, distill_alpha_ramp_steps=2))
    pairs = _teacher_and_online(model)
    assert len(pairs) == len(list(model.momentum.parameters())) > 50
    assert all(torch.equal(t, o) and not t.requires_grad for _, t, o in pairs)
    grouped = {id(p) for group in parameter_groups(model, 0.02) for p in group["params"]}
    assert grouped.isdisjoint(id(t) for _, t, _ in pairs)
    assert grouped == {id(p) for name, p in model.named_parameters() if not name.startswith("momentum.")}

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    batch = make_batch(model.config, batch_size=4)
    alphas = []
    for _ in range(3):
        before = {name: (t.clone(), o.clone()) for name, t, o in pairs}
        alphas.append(model.momentum.alpha().item())
        optimizer.zero_grad()
        model(batch).loss.backward()
        for name, teacher, _ in pairs:  # the EMA of the online weights this forward saw
            old_teacher, online = before[name]
            assert torch.equal(teacher, old_teacher * 0.995 + online * (1 - 0.995)), name
        optimizer.step()
    assert alphas == pytest.approx([0.0, 0.2, 0.4])  # ramped over 2 training forwards, then 0.4
    assert model.momentum.steps.item() == 3 and model.momentum.queue.position.item() == (3 * 4) % 8
    moved = max((t - o).abs().max().item() for _, t, o in pairs)
    assert moved > 1e-3  # the online model moved away and the teacher lags behind it
    model.eval()
    with torch.no_grad():
        model(batch)  # evaluation neither queues nor moves the teacher
    assert model.momentum.steps.item() == 3 and model.momentum.queue.position.item() == 4


def test_with_gradient_accumulation_the_teacher_takes_one_ema_step_per_update_and_queues_every_forward():
    torch.manual_seed(0)
    model = ALBEF(tiny_config(momentum_distillation=True, queue_size=64, momentum_every=3))
    pairs = _teacher_and_online(model)
    with torch.no_grad():  # the online model away from the teacher, so that each EMA step shows
        for _, _, online in pairs:
            online.add_(torch.randn_like(online) * 0.1)
    batch = make_batch(model.config, batch_size=4)
    start = {name: t.clone() for name, t, _ in pairs}
    for forward in range(1, 7):  # two updates of 3 accumulated forwards; the online weights stay put
        model(batch)
        steps = (forward + 2) // 3  # EMA steps so far: at forwards 1 and 4
        for name, teacher, online in pairs:
            expected = start[name]
            for _ in range(steps):
                expected = expected * 0.995 + online * (1 - 0.995)
            assert torch.equal(teacher, expected), (forward, name)
    assert model.momentum.steps.item() == 6 and model.momentum.queue.position.item() == 6 * 4


# ---- the EMA on ZeRO-3 partitions, 2 ranks, equals one process on the whole tensors ------------------


def _gathered(model) -> dict[str, torch.Tensor]:
    import deepspeed

    params = dict(model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {name: p.detach().clone() for name, p in params.items()}


def _zero3_steps(rank: int, world: int, store: str) -> dict:
    from pretrain.train.ds_config import build_ds_config
    from pretrain.train.engine import build_engine
    from pretrain.train.preflight import Setup
    from pretrain.train.recipe import Recipe

    start_deepspeed(rank, world, store)
    recipe = Recipe()
    recipe.schedule.micro_batch_size, recipe.optim.lr = 2, 1e-2
    ds_config = build_ds_config(recipe.dist.ds_config, recipe.schedule, world)
    ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 200  # 128-wide norms stay whole
    config = tiny_config(momentum_distillation=True, queue_size=8)
    engine = build_engine(Setup(recipe, None, config, ds_config, world))
    teacher = dict(engine.module.momentum.named_parameters())
    layout = {"partitioned": sum(p.ds_tensor.numel() < p.ds_numel for p in teacher.values()),
              "persistent": sum(bool(p.ds_persist) for p in teacher.values())}
    batch = {k: v[rank * 2:(rank + 1) * 2] for k, v in make_batch(config, batch_size=4).items() if k != "keys"}
    snapshots = [_gathered(engine.module)]
    for _ in range(2):
        out = engine(batch)
        engine.backward(out.loss)
        engine.step()
        snapshots.append(_gathered(engine.module))
    queue = engine.module.momentum.queue.image_ids.clone()
    dist.barrier()
    return {"layout": layout, "snapshots": snapshots if rank == 0 else None, "queue": queue}


@pytest.mark.slow
def test_the_ema_on_zero3_partitions_of_2_ranks_equals_one_process(tmp_path):
    results = run_on_ranks(_zero3_steps, store=tmp_path / "store", init_group=False)
    layout = results[0]["layout"]
    assert layout["partitioned"] > 20 and layout["persistent"] > 20, layout  # both kinds of parameter met
    assert torch.equal(results[0]["queue"], results[1]["queue"])  # every rank queued the global batch
    snapshots = results[0]["snapshots"]
    names = [name.removeprefix("momentum.") for name in snapshots[0] if name.startswith("momentum.")]
    for name in names:
        assert torch.equal(snapshots[0][f"momentum.{name}"], snapshots[0][name]), name  # a copy to start
    for before, after in zip(snapshots, snapshots[1:]):
        for name in names:
            teacher = f"momentum.{name}"
            expected = before[teacher] * 0.995 + before[name] * (1 - 0.995)  # one process, whole tensors
            assert torch.equal(after[teacher], expected), name
    assert any(not torch.equal(snapshots[2][name], snapshots[0][name]) for name in names)  # training moved
    assert math.isfinite(snapshots[2]["temp"].item())
