"""Optimisation of a training run: SGD parameter groups, gradient accumulation, warmup + cosine lr
schedule and the EMA of the weights.

Facts of the official KAPAO (YOLOv5) recipe, written anew:

* SGD, Nesterov, three parameter groups: BatchNorm weights (no decay), other weights (decay
  ``weight_decay * batch * accumulate / nominal_batch``) and biases (no decay).
* Gradients are accumulated up to the nominal batch (64): ``accumulate = max(round(64 / batch), 1)``.
* Warmup over ``max(round(warmup_epochs * batches_per_epoch), warmup_min_iters)`` iterations: the bias
  lr falls from ``warmup_bias_lr`` to the epoch's lr, the other lrs rise from 0, momentum rises from
  ``warmup_momentum`` to ``momentum``, accumulate rises from 1 (all linear, ``np.interp``).
* Cosine decay per epoch: ``lf(e) = ((1 - cos(e * pi / epochs)) / 2) * (lrf - 1) + 1``.
* EMA of weights and buffers, decay ``ema_decay * (1 - exp(-updates / ema_tau))``, after each step.

Deliberate difference: accumulate is capped at the number of batches per epoch, so a tiny dataset
still steps (why, and the other training deviations: docs/DESIGN.md, "Training deviations").
"""
from __future__ import annotations

import copy
import logging
import math
from typing import Callable, Mapping

import numpy as np
import torch
from torch import nn

from kapao.cfg.settings import Hyp
from kapao.train.distributed import unwrap

LOGGER = logging.getLogger(__name__)

GROUPS = ("bn", "weight", "bias")  # optimizer parameter groups, in this order


# ----------------------------------------------------------------------------------------------
# Schedule


def cosine_lf(epochs: int, lrf: float) -> Callable[[float], float]:
    """lr factor of epoch e: 1 at e = 0 falling along a half cosine to `lrf` at e = epochs."""
    return lambda e: ((1 - math.cos(e * math.pi / epochs)) / 2) * (lrf - 1) + 1


def warmup_iterations(hyp: Hyp, batches_per_epoch: int) -> int:
    """Number of warmup iterations (batches, counted over epochs)."""
    return max(round(hyp.warmup_epochs * batches_per_epoch), int(hyp.warmup_min_iters))


def accumulate_steps(hyp: Hyp, batch: int, batches_per_epoch: int | None = None) -> int:
    """Batches per optimizer step to reach the nominal batch; capped at the batches of an epoch."""
    acc = max(round(hyp.nominal_batch / batch), 1)
    return min(acc, batches_per_epoch) if batches_per_epoch else acc


def warmup_values(ni: int, nw: int, epoch_lr: float, hyp: Hyp, batch: int, max_accumulate: int
                  ) -> tuple[dict[str, float], float, int]:
    """Iteration `ni` of `nw` warmup iterations -> (lr per group name, momentum, accumulate).

    epoch_lr = lr0 * lf(epoch). Bias lr: warmup_bias_lr -> epoch_lr; other lrs 0 -> epoch_lr.
    """
    xi = [0, nw]
    lrs = {g: float(np.interp(ni, xi, [hyp.warmup_bias_lr if g == "bias" else 0.0, epoch_lr])) for g in GROUPS}
    momentum = float(np.interp(ni, xi, [hyp.warmup_momentum, hyp.momentum]))
    accumulate = int(max(1, np.interp(ni, xi, [1, hyp.nominal_batch / batch]).round()))
    return lrs, momentum, min(accumulate, max_accumulate)


def set_epoch_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Every group's lr = its initial lr (lr0) * `factor` (the schedule's lf(epoch))."""
    for g in optimizer.param_groups:
        g["lr"] = g["initial_lr"] * factor


def set_warmup(optimizer: torch.optim.Optimizer, lrs: Mapping[str, float], momentum: float) -> None:
    """Apply :func:`warmup_values`' lr (by group name) and momentum to the optimizer."""
    for g in optimizer.param_groups:
        g["lr"], g["momentum"] = lrs[g["name"]], momentum


# ----------------------------------------------------------------------------------------------
# Optimizer


def param_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters split into BatchNorm weights, other weights and biases (each exactly once)."""
    groups: dict[str, list[nn.Parameter]] = {g: [] for g in GROUPS}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if name == "bias":
                groups["bias"].append(p)
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                groups["bn"].append(p)
            else:
                groups["weight"].append(p)
    return groups


def build_optimizer(model: nn.Module, hyp: Hyp, batch: int, accumulate: int) -> torch.optim.SGD:
    """SGD (Nesterov) with groups bn / weight / bias; decay (scaled to the accumulated batch) on weights only."""
    decay = hyp.weight_decay * batch * accumulate / hyp.nominal_batch
    groups = param_groups(model)
    opt = torch.optim.SGD([{"params": groups[g], "name": g, "weight_decay": decay if g == "weight" else 0.0}
                           for g in GROUPS], lr=hyp.lr0, momentum=hyp.momentum, nesterov=True)
    for g in opt.param_groups:
        g["initial_lr"] = hyp.lr0
    LOGGER.info("optimizer: SGD(nesterov, lr0=%g, momentum=%g), %d BatchNorm weights and %d biases without decay, "
                "%d weights with decay %.3g", hyp.lr0, hyp.momentum, len(groups["bn"]), len(groups["bias"]),
                len(groups["weight"]), decay)
    return opt


# ----------------------------------------------------------------------------------------------
# EMA


class ModelEMA:
    """Exponential moving average of a model's floating-point weights and buffers.

    decay(u) = ema_decay * (1 - exp(-u / tau)) after u updates: the average follows the model closely
    early in training and ever more slowly later. ``module`` is an eval-mode copy, never trained.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0):
        self.module = copy.deepcopy(unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, updates

    def decay_at(self, updates: int) -> float:
        """The decay applied by the `updates`-th update."""
        return self.decay * (1 - math.exp(-updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """ema = d * ema + (1 - d) * model for every floating-point tensor of the state dict."""
        self.updates += 1
        d = self.decay_at(self.updates)
        src = unwrap(model).state_dict()
        dst = self.module.state_dict()
        pairs = [(v, src[k].detach()) for k, v in dst.items() if v.dtype.is_floating_point]
        torch._foreach_lerp_([a for a, _ in pairs], [b for _, b in pairs], 1.0 - d)  # a = d*a + (1-d)*b
