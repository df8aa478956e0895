"""One training batch's weight update (kapao.train.update) on a tiny stand-in network: forward + loss,
accumulated backward, the optimizer step and the EMA."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kapao.train.optim import ModelEMA
from kapao.train.update import BatchUpdater, NonFiniteLoss


def _loss(out, targets):
    """A squared error and its 4 'terms' (box/obj/cls/kp), as KapaoLoss returns (loss, items)."""
    loss = ((out - targets) ** 2).mean()
    return loss, torch.stack([loss.detach()] * 4)


def _updater(model, ema=None, lr=0.1):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return BatchUpdater(model, _loss, opt, torch.amp.GradScaler("cpu", enabled=False), ema, torch.device("cpu"), amp=False)


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (2, 3), generator=g, dtype=torch.uint8), torch.rand(2, 1, generator=g)


def test_forward_backward_scales_images_to_unit_range_and_returns_detached_terms():
    seen = []
    model = nn.Linear(3, 1)
    model.register_forward_hook(lambda m, x, y: seen.append(x[0]))
    imgs, targets = _batch()
    items = _updater(model).forward_backward(imgs, targets)
    assert items.shape == (4,) and not items.requires_grad
    assert torch.equal(seen[0], imgs.float() / 255)
    assert model.weight.grad is not None


def test_gradients_accumulate_until_the_step_which_zeroes_them():
    model = nn.Linear(3, 1)
    updater = _updater(model)
    imgs, targets = _batch()
    updater.forward_backward(imgs, targets)
    once = model.weight.grad.clone()
    updater.forward_backward(imgs, targets)
    assert torch.allclose(model.weight.grad, 2 * once)  # two batches' gradients, not the last one's
    before = model.weight.detach().clone()
    updater.optimizer_step()
    assert model.weight.grad is None
    assert torch.allclose(model.weight.detach(), before - 0.1 * 2 * once)  # plain SGD on the summed gradient


def test_step_updates_the_ema_copy_only_at_the_step():
    model = nn.Linear(3, 1)
    ema = ModelEMA(model, decay=0.9, tau=1.0)
    updater = _updater(model, ema)
    updater.forward_backward(*_batch())
    assert ema.updates == 0
    updater.optimizer_step()
    assert ema.updates == 1 and not torch.equal(ema.module.weight, model.weight)


def test_non_finite_loss_raises_before_any_gradient():
    model = nn.Linear(3, 1)
    imgs, targets = _batch()
    with pytest.raises(NonFiniteLoss, match="the loss became nan"):
        _updater(model).forward_backward(imgs, torch.full_like(targets, float("nan")))
    assert model.weight.grad is None
