"""Optimizer groups, warmup + cosine schedule and EMA (kapao.train.optim) on hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kapao.cfg.settings import Hyp
from kapao.models.network import build_model
from kapao.train.optim import (
    ModelEMA,
    accumulate_steps,
    build_optimizer,
    cosine_lf,
    param_groups,
    set_epoch_lr,
    set_warmup,
    warmup_iterations,
    warmup_values,
)


def test_cosine_schedule_points():
    lf = cosine_lf(10, 0.2)
    assert lf(0) == pytest.approx(1.0)
    assert lf(5) == pytest.approx(0.6)  # half way: (1 + lrf) / 2
    assert lf(10) == pytest.approx(0.2)  # final lr = lrf * lr0
    assert lf(2.5) == pytest.approx(1 - 0.4 * (1 - math.cos(math.pi / 4)))  # 0.882843
    assert all(lf(e) > lf(e + 1) for e in range(10))


def test_warmup_values_hand_computed():
    hyp = Hyp()  # warmup_bias_lr 0.1, warmup_momentum 0.8, momentum 0.937, nominal batch 64
    lrs, mom, acc = warmup_values(0, 100, 0.01, hyp, batch=16, max_accumulate=4)
    assert lrs == {"bn": 0.0, "weight": 0.0, "bias": pytest.approx(0.1)} and mom == pytest.approx(0.8) and acc == 1
    lrs, mom, acc = warmup_values(50, 100, 0.01, hyp, batch=16, max_accumulate=4)
    assert lrs["bias"] == pytest.approx(0.055) and lrs["weight"] == pytest.approx(0.005)
    assert lrs["bn"] == pytest.approx(0.005) and mom == pytest.approx(0.8685) and acc == 2  # round(2.5) = 2
    lrs, mom, acc = warmup_values(100, 100, 0.008, hyp, batch=16, max_accumulate=4)
    assert list(lrs.values()) == [pytest.approx(0.008)] * 3 and mom == pytest.approx(0.937) and acc == 4
    assert warmup_values(75, 100, 0.01, hyp, batch=16, max_accumulate=2)[2] == 2  # capped


def test_warmup_iterations_and_accumulate():
    hyp = Hyp()
    assert warmup_iterations(hyp, 7329) == 21987  # 3 epochs of COCO at batch 16
    assert warmup_iterations(hyp, 10) == 1000  # at least warmup_min_iters
    assert accumulate_steps(hyp, 16) == 4 and accumulate_steps(hyp, 24) == 3
    assert accumulate_steps(hyp, 128) == 1 and accumulate_steps(hyp, 8, batches_per_epoch=5) == 5


def test_param_groups_bn_and_biases_get_no_decay():
    model = build_model("n", 17)
    groups = param_groups(model)
    ids = {g: {id(p) for p in ps} for g, ps in groups.items()}
    assert sum(len(s) for s in ids.values()) == len({id(p) for p in model.parameters()})  # each exactly once
    bn_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    biases = {id(p) for n, p in model.named_parameters() if n.endswith(".bias")}
    assert ids["bn"] == bn_weights and ids["bias"] == biases
    assert all(p.ndim == 4 for p in groups["weight"])  # conv kernels only
    opt = build_optimizer(model, Hyp(), batch=24, accumulate=3)
    assert [g["name"] for g in opt.param_groups] == ["bn", "weight", "bias"]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, pytest.approx(5e-4 * 24 * 3 / 64), 0.0]
    assert all(g["nesterov"] and g["momentum"] == 0.937 and g["lr"] == 0.01 for g in opt.param_groups)


def test_frozen_parameters_are_left_out():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model[0].weight.requires_grad_(False)
    groups = param_groups(model)
    assert [len(groups[g]) for g in ("bn", "weight", "bias")] == [1, 0, 2]  # BN weight; conv + BN biases


def test_epoch_lr_and_warmup_are_applied_by_group():
    """The trainer's two ways of setting the optimizer: lr0 * lf(epoch) on every group, and a
    warmup iteration's per-group lr and shared momentum."""
    hyp = Hyp()
    opt = build_optimizer(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), hyp, batch=16, accumulate=4)
    set_epoch_lr(opt, cosine_lf(10, 0.2)(5))
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.006)] * 3  # 0.01 * 0.6
    assert all(g["initial_lr"] == 0.01 for g in opt.param_groups)  # the schedule's base stays lr0
    lrs, momentum, _ = warmup_values(50, 100, 0.01, hyp, batch=16, max_accumulate=4)
    set_warmup(opt, lrs, momentum)
    assert {g["name"]: g["lr"] for g in opt.param_groups} == lrs
    assert all(g["momentum"] == momentum == pytest.approx(0.8685) for g in opt.param_groups)


def test_ema_decay_and_update():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    ema = ModelEMA(model, decay=0.9999, tau=2000)
    assert ema.decay_at(2000) == pytest.approx(0.9999 * (1 - math.exp(-1)))
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    model.train()(torch.randn(2, 3, 8, 8))  # moves BN running stats and counts a batch
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    d = 0.9999 * (1 - math.exp(-1 / 2000))
    src = model.state_dict()
    for k, v in ema.module.state_dict().items():
        if v.dtype.is_floating_point:  # weights and buffers: d * ema + (1 - d) * model
            torch.testing.assert_close(v, d * before[k] + (1 - d) * src[k])
        else:  # num_batches_tracked: not averaged
            assert torch.equal(v, before[k])
    assert ema.updates == 1 and not any(p.requires_grad for p in ema.module.parameters())


def test_ema_over_several_updates_matches_a_scalar_reference():
    """Three updates towards a model whose single weight moves 1 -> 2 -> 3 -> 4, with a short tau so
    the decay changes visibly; the reference is the recurrence e_u = d(u) e_{u-1} + (1 - d(u)) w_u."""
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = ModelEMA(model, decay=0.9, tau=2.0, updates=0)
    e = 1.0
    for u, w in enumerate((2.0, 3.0, 4.0), start=1):
        with torch.no_grad():
            model.weight.fill_(w)
        ema.update(model)
        d = 0.9 * (1 - math.exp(-u / 2.0))
        e = d * e + (1 - d) * w
        assert float(ema.module.weight) == pytest.approx(e, rel=1e-6)
    assert ema.updates == 3 and ema.module.weight.data_ptr() != model.weight.data_ptr()
    assert not ema.module.training  # an eval-mode copy
