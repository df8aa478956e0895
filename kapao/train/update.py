"""The weight update of one training batch: forward + loss under autocast, scaled backward, and (when the
loop says so) the optimizer step and the EMA update (:class:`BatchUpdater`)."""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from kapao.errors import KapaoError
from kapao.train.optim import ModelEMA


class NonFiniteLoss(KapaoError):
    """The loss became NaN/inf: training diverged."""


class BatchUpdater:
    """The work of one batch: forward + loss (autocast), backward (scaled), and the optimizer step + EMA
    update once gradients of `accumulate` batches are in. The loop decides when to step."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any, Tensor], tuple[Tensor, Tensor]],
                 optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, ema: ModelEMA | None,
                 device: torch.device, amp: bool, world_size: int = 1) -> None:
        self.model, self.loss_fn, self.optimizer, self.scaler, self.ema = model, loss_fn, optimizer, scaler, ema
        self.device, self.amp, self.world_size = device, amp, world_size
        self.ddp = isinstance(model, nn.parallel.DistributedDataParallel)

    def forward_backward(self, imgs: Tensor, targets: Tensor, sync: bool = True) -> Tensor:
        """imgs (B, 3, H, W) uint8, targets (M, 6 + 3K) -> loss terms (4,) box/obj/cls/kp, detached.

        Gradients are accumulated; under DDP they are all-reduced only when `sync` (a step follows).
        Raises NonFiniteLoss (on every rank together) before a NaN/inf loss reaches the gradients.
        """
        model = self.model  # narrowed to DDP (as self.ddp says) for the type checker
        with model.no_sync() if isinstance(model, nn.parallel.DistributedDataParallel) and not sync \
                else contextlib.nullcontext():
            x = imgs.to(self.device, non_blocking=True).float() / 255
            with torch.autocast(self.device.type, enabled=self.amp):
                loss, items = self.loss_fn(self.model(x), targets.to(self.device))
            self._check_finite(loss)
            self.scaler.scale(loss * self.world_size).backward()  # DDP averages gradients over processes
        return items

    def _check_finite(self, loss: Tensor) -> None:
        bad = (~torch.isfinite(loss.detach())).float()
        if self.ddp:  # every rank must stop together, or the others hang in all-reduce
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            value = float(loss.detach())
            raise NonFiniteLoss(f"the loss became {value:g}" if not math.isfinite(value)
                                else "the loss became non-finite in another process")

    def optimizer_step(self) -> None:
        """Optimizer step on the accumulated (scaled) gradients, zero them, update the EMA."""
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
