"""The weight update of one training batch: forward + loss under autocast, scaled backward, and (when the
loop says so) the optimizer step and the EMA update (:class:`BatchUpdater`);
and the same loss on the validation batches (:class:`ValLoss`)."""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from kapao.backends.runtimes import TorchBackend
from kapao.cfg.settings import VAL_SETTINGS
from kapao.distributed import DistEnv
from kapao.errors import KapaoError
from kapao.eval.val import validate
from kapao.infer.engine import Predictor
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


class ValLoss:
    """The training loss (box, obj, cls, kp) of the validation batches, from the same forward pass that
    gives the validation poses: :meth:`forward` is the Predictor's network (the folded copy of `model`,
    eval mode, keeping its raw head outputs); :meth:`add` (the batch hook of
    :func:`kapao.eval.val.validate`) scores them against the batch's targets."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any, Tensor], tuple[Tensor, Tensor]],
                 device: torch.device, half: bool) -> None:
        self.backend = TorchBackend(model, device, half, fold_bn=True)  # a folded copy: the EMA is untouched
        self.loss_fn = loss_fn
        self.raw: list[Tensor] = []
        self.sums, self.batches = torch.zeros(4, dtype=torch.float64), 0

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> decoded (B, N, no); the raw outputs are kept for :meth:`add`."""
        decoded, self.raw = self.backend.model(x)
        return decoded

    def add(self, targets: Tensor) -> None:
        with torch.no_grad():
            raw = [r.float().clone() for r in self.raw]  # out of inference mode, fp32 as in training
            _, items = self.loss_fn(raw, targets.to(raw[0].device))
        self.sums += items.double().cpu()
        self.batches += 1

    def validate(self, loader: Any, keep: int = 0, env: DistEnv | None = None) -> tuple[Any, list[float]]:
        """(:class:`kapao.eval.val.ValResult` of the model on `loader` at VAL_SETTINGS, the mean losses); under
        torchrun (`env`) each rank runs its share and only rank 0 gets the result (the others None), with the
        losses of its own share."""
        predictor = Predictor(self.forward, self.backend.schema, self.backend.device, VAL_SETTINGS, self.backend.half)
        progress = env is None or env.main
        return validate(predictor, loader, progress=progress, keep=keep, batch_hook=self.add, env=env), self.mean()

    def mean(self) -> list[float]:
        """Mean box, obj, cls, kp losses over the batches seen (as the training columns)."""
        return (self.sums / max(self.batches, 1)).tolist()
