"""The `train` verb: SGD with warmup + cosine schedule, EMA, AMP, DDP, per-epoch validation, checkpoints.

Facts of the official KAPAO (YOLOv5) recipe, written anew:

* SGD, Nesterov, three parameter groups: BatchNorm weights (no decay), other weights (decay
  ``weight_decay * batch * accumulate / nominal_batch``) and biases (no decay).
* Gradients are accumulated up to the nominal batch (64): ``accumulate = max(round(64 / batch), 1)``.
* Warmup over ``max(round(warmup_epochs * batches_per_epoch), warmup_min_iters)`` iterations: the bias
  lr falls from ``warmup_bias_lr`` to the epoch's lr, the other lrs rise from 0, momentum rises from
  ``warmup_momentum`` to ``momentum``, accumulate rises from 1 (all linear, ``np.interp``).
* Cosine decay per epoch: ``lf(e) = ((1 - cos(e * pi / epochs)) / 2) * (lrf - 1) + 1``.
* EMA of weights and buffers, decay ``ema_decay * (1 - exp(-updates / ema_tau))``, after each step.
* fitness = 0.1 AP50 + 0.9 AP of the EMA model; best.pt holds the fittest epoch.

Deliberate differences: a step never mixes two epochs (the step counter restarts each epoch; the
official code carries it over but zeroes the gradients anyway) and accumulate is capped at the number
of batches per epoch, so a tiny dataset still steps. Augmentation draws are seeded per (seed, epoch,
image), so a resumed run repeats exactly what the uninterrupted one would have done.

Checkpoints (``weights/last.pt``, ``weights/best.pt``, via :func:`kapao.weights.save_checkpoint`): the
EMA weights as the model; in ``extra`` the raw model, optimizer, scaler, EMA update count, epoch (the
last completed one), best fitness/epoch, metrics, plain train args, hyp and dataset config. When a run
finishes, optimizer/scaler/raw model are stripped from both files. Ctrl-C saves the current weights as
last.pt under the last completed epoch (resume redoes the interrupted epoch); a NaN/inf loss stops the
run without touching last.pt.

Multi-GPU: every torchrun process calls :func:`train` (``torchrun --nproc_per_node N -m kapao train …``,
or :func:`launch_distributed` for ``--device 0,1,…``); rank 0 alone validates, logs, plots and saves.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import Tensor, nn
from torch.utils.data import Dataset, DistributedSampler

from kapao.config import VAL_SETTINGS, DatasetConfig, Hyp, KeypointSchema, load_dataset_config, load_hyp
from kapao.errors import ConfigError, DataError, KapaoError
from kapao.runtime import atomic_write, setup_logging

LOGGER = logging.getLogger("kapao")

DEFAULT_EPOCHS = {"coco": 500, "crowdpose": 300}  # official recipes; anything else: FALLBACK_EPOCHS
FALLBACK_EPOCHS = 300
GROUPS = ("bn", "weight", "bias")  # optimizer parameter groups, in this order
LOSS_NAMES = ("box", "obj", "cls", "kp")
VAL_DRAW_CONF = 0.25  # poses above this score are drawn in val_pred.jpg
DIST_TIMEOUT = timedelta(minutes=60)  # rank 0 validates while the others wait


# ==============================================================================================
# Arguments


@dataclass
class TrainArgs:
    """Everything a training run needs; stored as args.yaml and in every checkpoint (plain data)."""

    data: str = "coco"  # dataset: built-in name (coco, crowdpose) or YAML path
    size: str | None = None  # model size n/s/m/l/x; default: the --weights' size, else s
    imgsz: int = 1280  # square train/val input size, a multiple of 64
    epochs: int | None = None  # default: 500 for coco, 300 for crowdpose and custom data
    batch: int = 16  # total batch over all processes
    device: str = ""  # '', 'cpu', '0' (single process); several GPUs via launch_distributed/torchrun
    workers: int = 8  # data-loader workers per process (capped at CPU count / processes)
    weights: str | None = None  # initial weights: kapao checkpoint, official KAPAO file, state dict or name
    hyp: str | None = None  # hyperparameter YAML or built-in name (default: the official recipe)
    hyp_overrides: dict[str, float] = field(default_factory=dict)  # applied on top of `hyp`
    project: str = "runs/train"
    name: str = "exp"
    exist_ok: bool = False  # reuse project/name instead of incrementing it
    resume: bool | str | None = None  # True/'' (latest run), a run folder or a last.pt
    noval: bool = False  # validate only after the final epoch
    nosave: bool = False  # write last.pt/best.pt only after the final epoch (and on Ctrl-C)
    patience: int = 100  # stop after this many epochs without fitness improvement (0: never)
    cache: bool = False  # keep the resized training images in RAM
    sync_bn: bool = False  # SyncBatchNorm in multi-GPU training
    amp: bool = True  # mixed precision on CUDA (always off on CPU)
    seed: int = 0
    plots: bool = True  # train_batch*.jpg, val_pred.jpg, results.png

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainArgs":
        """From args.yaml/checkpoint data; unknown keys (from another kapao version) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ==============================================================================================
# Schedule, optimizer, EMA (small pieces, unit-tested on their own)


def cosine_lf(epochs: int, lrf: float) -> Callable[[float], float]:
    """lr factor of epoch e: 1 at e = 0 falling along a half cosine to `lrf` at e = epochs."""
    return lambda e: ((1 - math.cos(e * math.pi / epochs)) / 2) * (lrf - 1) + 1


def warmup_iterations(hyp: Hyp, batches_per_epoch: int) -> int:
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


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class ModelEMA:
    """Exponential moving average of a model's floating-point weights and buffers.

    decay(u) = ema_decay * (1 - exp(-u / tau)) after u updates: the average follows the model closely
    early in training and ever more slowly later. ``module`` is an eval-mode copy, never trained.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0):
        import copy

        self.module = copy.deepcopy(unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, updates

    def decay_at(self, updates: int) -> float:
        return self.decay * (1 - math.exp(-updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay_at(self.updates)
        src = unwrap(model).state_dict()
        dst = self.module.state_dict()
        pairs = [(v, src[k].detach()) for k, v in dst.items() if v.dtype.is_floating_point]
        torch._foreach_lerp_([a for a, _ in pairs], [b for _, b in pairs], 1.0 - d)  # a = d*a + (1-d)*b


def fitness(metrics: Mapping[str, float]) -> float:
    """Model selection score: 0.1 AP50 + 0.9 AP (OKS)."""
    return 0.1 * float(metrics.get("AP50", 0.0)) + 0.9 * float(metrics.get("AP", 0.0))


# ==============================================================================================
# Distributed set-up and launching


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a torchrun job (rank 0 of 1 outside torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_environ(cls) -> "DistEnv":
        if "LOCAL_RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
            return cls()
        return cls(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_device(args: TrainArgs, env: DistEnv) -> torch.device:
    """The device of this process; joins the process group (nccl on CUDA, gloo on CPU) under torchrun."""
    from kapao.runtime import select_device

    if not env.distributed:
        return select_device(args.device)
    cpu = str(args.device).strip().lower() == "cpu" or not torch.cuda.is_available()
    if cpu:
        device, backend = torch.device("cpu"), "gloo"
    else:  # torchrun/launch_distributed set CUDA_VISIBLE_DEVICES: process i uses visible GPU i
        if torch.cuda.device_count() <= env.local_rank:
            raise ConfigError(f"process {env.local_rank} of {env.world_size} has no GPU (only "
                              f"{torch.cuda.device_count()} visible); start fewer processes or use --device cpu")
        torch.cuda.set_device(env.local_rank)
        device, backend = torch.device("cuda", env.local_rank), "nccl"
    dist.init_process_group(backend, timeout=DIST_TIMEOUT)
    if env.main:
        LOGGER.info("DDP: %d processes, backend %s", env.world_size, backend)
    return device


def _broadcast(obj: Any, env: DistEnv) -> Any:
    """Rank 0's value of `obj` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, 0)
    return box[0]


def should_launch(device: str | None) -> bool:
    """True when `device` lists several GPUs (0,1,...) and this process is not already one of torchrun's:
    the CLI then calls :func:`launch_distributed` instead of :func:`train`."""
    ids = [d for d in str(device or "").lower().replace("cuda:", "").split(",") if d.strip()]
    return len(ids) > 1 and "LOCAL_RANK" not in os.environ


def launch_distributed(argv: Sequence[str], devices: str | Sequence[int | str], nproc: int | None = None) -> int:
    """Re-run ``kapao train <argv>`` as ``python -m torch.distributed.run --nproc_per_node N -m kapao train``.

    devices: GPU ids ('0,1,2,3' or a list), which become CUDA_VISIBLE_DEVICES (N = their count), or
    'cpu' with `nproc` processes (gloo backend; how CI tests it). Returns the launcher's exit code.
    """
    env = dict(os.environ)
    if isinstance(devices, str) and devices.strip().lower() == "cpu":
        n = int(nproc or 2)
    else:
        ids = [str(d).strip() for d in (devices.split(",") if isinstance(devices, str) else devices) if str(d).strip()]
        if not ids or not all(i.isdigit() for i in ids):
            raise ConfigError(f"--device {devices!r}: expected GPU ids such as 0,1,2,3")
        n = int(nproc or len(ids))
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
           "-m", "kapao", "train", *argv]
    LOGGER.info("launching %d processes: %s", n, " ".join(cmd))
    return subprocess.call(cmd, env=env)


# ==============================================================================================
# Run folder, resume, data checks


def resolve_resume(spec: bool | str | os.PathLike, project: str | os.PathLike = "runs/train") -> tuple[Path, Path]:
    """(run folder, last.pt) of a resume spec: True/'' (latest last.pt under `project`), a run folder,
    its weights/ folder, or a checkpoint file."""
    if spec is True or (isinstance(spec, str) and spec.strip() in ("", "latest")):
        found = sorted(Path(project).glob("*/weights/last.pt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise ConfigError(f"--resume: no run to resume under {project} (no */weights/last.pt); "
                              "pass the run folder or its weights/last.pt")
        last = found[-1]
    else:
        p = Path(os.fspath(spec)).expanduser()
        last = p if p.is_file() else next((c for c in (p / "weights" / "last.pt", p / "last.pt") if c.is_file()), None)
        if last is None:
            raise ConfigError(f"--resume {spec}: no checkpoint there (expected a last.pt, or a run folder "
                              "holding weights/last.pt)")
    run_dir = last.parent.parent if last.parent.name == "weights" else last.parent
    return run_dir, last


def default_epochs(cfg: DatasetConfig) -> int:
    return DEFAULT_EPOCHS.get(cfg.name, FALLBACK_EPOCHS)


def _absolute_if_file(spec: str | None) -> str | None:
    """An existing file's absolute path; names (coco, default, kapao_s_coco) and None unchanged."""
    return str(Path(spec).expanduser().resolve()) if spec and Path(spec).expanduser().is_file() else spec


def build_hyp(args: TrainArgs) -> Hyp:
    hyp = load_hyp(args.hyp)
    return Hyp.from_dict({**hyp.to_dict(), **dict(args.hyp_overrides)}, where="hyp overrides") \
        if args.hyp_overrides else hyp


# ==============================================================================================
# Data: deterministic per-epoch order and per-image augmentation seeds


class EpochSampler(DistributedSampler):
    """This process's share of a per-epoch shuffled order (a function of seed and epoch only).

    Yields (epoch, index) keys for :class:`SeededItems`; call ``set_epoch`` before every epoch.
    """

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        return ((self.epoch, i) for i in super().__iter__())


class SeededItems(Dataset):
    """Reseeds the dataset's augmentation from (seed, epoch, index) before each item, so that the
    draws do not depend on workers, processes or where a run was resumed."""

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, i = key
        self.dataset.reseed(int(np.random.SeedSequence([self.seed, epoch, i]).generate_state(1)[0]))
        return self.dataset[i]


# ==============================================================================================
# The trainer


class NonFiniteLoss(KapaoError):
    """The loss became NaN/inf: training diverged."""


class TrainStep:
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
        with self.model.no_sync() if self.ddp and not sync else contextlib.nullcontext():
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

    def step(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)


@dataclass
class RunState:
    """What a checkpoint carries besides weights and optimizer."""

    start_epoch: int = 0
    best_fitness: float = 0.0
    best_epoch: int = -1
    epochs_done: int = -1  # last epoch whose end-of-epoch work (validation, checkpoint) finished


class Trainer:
    """One training run: set-up in __init__, then :meth:`fit`. Rank 0 alone validates, logs and writes."""

    def __init__(self, args: TrainArgs, run_dir: Path, device: torch.device, env: DistEnv,
                 ckpt: Mapping[str, Any] | None = None) -> None:
        self.args, self.run_dir, self.device, self.env = args, run_dir, device, env
        self.wdir = run_dir / "weights"
        self.cfg = load_dataset_config(args.data)
        for split in ("train", "val") if env.main else ("train",):  # fail before building anything
            self.cfg.require(split)
        self.hyp = Hyp.from_dict(ckpt["extra"]["hyp"]) if ckpt is not None else build_hyp(args)
        self.epochs = int(args.epochs or default_epochs(self.cfg))
        if args.batch < env.world_size or args.batch % env.world_size:
            raise ConfigError(f"--batch {args.batch} must be a positive multiple of the number of processes "
                              f"({env.world_size})")
        self.batch = args.batch // env.world_size  # per process
        self.amp = bool(args.amp) and device.type == "cuda"
        self.state = RunState()
        self._setup_model()
        self.train_loader, self.sampler = self._train_loader()
        self.nb = len(self.train_loader)
        self._setup_optimization()
        if ckpt is not None:
            self._restore(ckpt)
        if env.distributed:
            self.model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.stepper = TrainStep(self.model, self.loss_fn, self.optimizer, self.scaler, self.ema, device, self.amp,
                                 env.world_size)
        self.val_loader = self._val_loader() if env.main else None
        self.metric_names = self._metric_names() if env.main else ()
        self.csv_rows = self._previous_rows() if env.main else []

    # -- set-up pieces ---------------------------------------------------------------------------
    def _setup_model(self) -> None:
        """Model (initial weights transferred), its EMA (rank 0) and the loss; resolves args.size."""
        from kapao.loss import KapaoLoss
        from kapao.model import build_model

        args = self.args
        torch.manual_seed(args.seed)  # the same initial weights on every rank
        init_sd, info = self._initial_weights()
        self.model = build_model(args.size or info.get("size") or "s", self.cfg.schema).to(self.device)
        if init_sd is not None:
            self._transfer(init_sd, info)
        self.args = dataclasses.replace(  # as resolved, so that a resume finds the same run anywhere
            args, size=self.model.size, epochs=self.epochs, data=_absolute_if_file(args.data),
            hyp=_absolute_if_file(args.hyp), weights=_absolute_if_file(args.weights))
        self.ema = ModelEMA(self.model, self.hyp.ema_decay, self.hyp.ema_tau) if self.env.main else None
        self.loss_fn = KapaoLoss(self.model, self.hyp, args.imgsz)

    def _setup_optimization(self) -> None:
        """Accumulation, warmup length, lr schedule, SyncBatchNorm, optimizer and grad scaler."""
        hyp, batch = self.hyp, self.args.batch
        self.accumulate = accumulate_steps(hyp, batch, self.nb)
        if self.accumulate < accumulate_steps(hyp, batch):
            LOGGER.warning("only %d batches per epoch: accumulating %d instead of %d batches per step (nominal "
                           "batch %d); lower hyp nominal_batch to match", self.nb, self.accumulate,
                           accumulate_steps(hyp, batch), hyp.nominal_batch)
        self.nw = warmup_iterations(hyp, self.nb)
        self.lf = cosine_lf(self.epochs, hyp.lrf)
        if self.args.sync_bn and self.env.distributed:
            if self.device.type == "cuda":
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
                LOGGER.info("using SyncBatchNorm")
            else:
                LOGGER.warning("--sync-bn needs CUDA; ignored on CPU")
        self.optimizer = build_optimizer(self.model, hyp, batch, self.accumulate)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)

    def _initial_weights(self) -> tuple[dict[str, Tensor] | None, dict[str, Any]]:
        if not self.args.weights or self.args.resume:
            return None, {}
        from kapao.weights import load_weights

        return load_weights(self.args.weights)

    def _transfer(self, state_dict: Mapping[str, Tensor], info: Mapping[str, Any]) -> None:
        from kapao.weights import transfer_weights

        n, total = transfer_weights(self.model, state_dict, exclude=("anchors",))
        k = info.get("num_keypoints")
        note = (f" (the weights have {k} keypoints, the data {self.cfg.schema.num_keypoints}: the head starts fresh)"
                if k and k != self.cfg.schema.num_keypoints else "")
        if self.env.main:
            LOGGER.info("transferred %d/%d tensors from %s%s", n, total, info.get("path", self.args.weights), note)
            if n < total // 2:
                LOGGER.warning("fewer than half of the model's tensors matched the weights (model kapao-%s, "
                               "weights kapao-%s); check --size", self.model.size, info.get("size"))

    def _train_loader(self) -> tuple[torch.utils.data.DataLoader, EpochSampler]:
        from kapao.data import PoseDataset, build_dataloader

        ds = PoseDataset(self.cfg, "train", self.args.imgsz, self.hyp, augment=True, batch_size=self.batch,
                         cache_images=self.args.cache)
        sampler = EpochSampler(ds, num_replicas=self.env.world_size, rank=self.env.rank, shuffle=True,
                               seed=self.args.seed)
        workers = min(self.args.workers, (os.cpu_count() or 1) // self.env.world_size)
        loader = build_dataloader(SeededItems(ds, self.args.seed), self.batch, workers, shuffle=False,
                                  sampler=sampler, seed=self.args.seed + self.env.rank)
        return loader, sampler

    def _val_loader(self) -> torch.utils.data.DataLoader:
        from kapao.val import make_val_loader

        workers = min(self.args.workers, os.cpu_count() or 1)
        return make_val_loader(self.cfg, "val", self.args.imgsz, self.batch, workers)

    def _restore(self, ckpt: Mapping[str, Any]) -> None:
        """Continue from a checkpoint: raw model, EMA, optimizer, scaler, epoch counters."""
        extra = ckpt["extra"]
        epoch = int(extra["epoch"])
        missing = [k for k in ("model", "optimizer") if k not in extra]
        if missing:
            raise KapaoError(f"{self.wdir / 'last.pt'} has no {' and '.join(missing)} state, so it cannot be resumed; "
                             "start a new run with --weights pointing at it instead")
        self.model.load_state_dict(extra["model"])
        self.optimizer.load_state_dict(extra["optimizer"])
        if extra.get("scaler"):
            self.scaler.load_state_dict(extra["scaler"])
        if self.ema is not None:
            self.ema.module.load_state_dict(ckpt["state_dict"])
            self.ema.updates = int(extra.get("ema_updates", 0))
        self.state = RunState(start_epoch=epoch + 1, best_fitness=float(extra.get("best_fitness", 0.0)),
                              best_epoch=int(extra.get("best_epoch", -1)), epochs_done=epoch)
        if self.env.main:
            LOGGER.info("resuming from epoch %d of %d (%d EMA updates)", epoch + 1, self.epochs,
                        self.ema.updates if self.ema else 0)

    # -- the loop ------------------------------------------------------------------------------------
    def fit(self) -> Path:
        t0 = time.time()
        if self.env.main:
            LOGGER.info("training %s for %d epochs: imgsz %d, batch %d (x%d processes), accumulate %d, %d batches "
                        "per epoch, %d warmup iterations, %s%s", self.cfg.name, self.epochs, self.args.imgsz,
                        self.batch, self.env.world_size, self.accumulate, self.nb, self.nw, self.device,
                        ", AMP" if self.amp else "")
        epoch = self.state.start_epoch
        try:
            for epoch in range(self.state.start_epoch, self.epochs):
                losses = self.train_epoch(epoch)
                if self.end_epoch(epoch, losses):
                    break
        except KeyboardInterrupt:
            if self.env.main:
                self.save_interrupted()
            raise
        if self.env.main:
            self.finish(epoch, time.time() - t0)
        return self.run_dir

    def set_epoch_lr(self, epoch: int) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * self.lf(epoch)

    def train_epoch(self, epoch: int) -> list[float]:
        """One pass over the training data; returns the mean box/obj/cls/kp losses."""
        from tqdm import tqdm

        self.model.train()
        self.sampler.set_epoch(epoch)
        self.set_epoch_lr(epoch)
        self.optimizer.zero_grad(set_to_none=True)
        mloss = torch.zeros(4, device=self.device)
        accumulate, last_step = self.accumulate, -1
        bar = tqdm(self.train_loader, total=self.nb, disable=not self.env.main, dynamic_ncols=True,
                   bar_format="{l_bar}{bar:10}{r_bar}")
        for i, (imgs, targets, _) in enumerate(bar):
            ni = i + self.nb * epoch
            if ni <= self.nw:
                accumulate = self.warmup(ni, epoch)
            if self.env.main and i < 3 and epoch == self.state.start_epoch:
                self.plot_batch(i, imgs, targets)
            step = i - last_step >= accumulate
            try:
                items = self.stepper.forward_backward(imgs, targets, sync=step)
            except NonFiniteLoss as e:
                raise NonFiniteLoss(f"{e} at epoch {epoch}, iteration {i}: training diverged; lower lr0 (--hyp), or "
                                    f"check the data and labels. The last good checkpoint {self.wdir / 'last.pt'} is "
                                    "kept (resume from it with a lower lr0 or other data).") from None
            if step:
                self.stepper.step()
                last_step = i
            mloss = (mloss * i + items) / (i + 1)
            if self.env.main:
                bar.set_description(self._progress(epoch, mloss, len(targets), imgs.shape[-1]))
        return [float(v) for v in mloss]

    def warmup(self, ni: int, epoch: int) -> int:
        lrs, momentum, accumulate = warmup_values(ni, self.nw, self.hyp.lr0 * self.lf(epoch), self.hyp,
                                                  self.args.batch, self.accumulate)
        for g in self.optimizer.param_groups:
            g["lr"], g["momentum"] = lrs[g["name"]], momentum
        return accumulate

    # -- end of epoch: validation, checkpoints, results ----------------------------------------------
    def end_epoch(self, epoch: int, losses: list[float]) -> bool:
        """Validate (rank 0), save, log; returns True when training should stop (on every rank)."""
        stop = False
        if self.env.main:
            final = epoch + 1 == self.epochs
            metrics = self.validate() if (not self.args.noval or final) else {}
            fi = fitness(metrics) if metrics else None
            improved = fi is not None and fi >= self.state.best_fitness
            if improved:
                self.state.best_fitness, self.state.best_epoch = fi, epoch
            self.record(epoch, losses, metrics, fi)
            patience = self.args.patience
            stop = bool(patience) and fi is not None and epoch - self.state.best_epoch >= patience
            if not self.args.nosave or final or stop:
                self.save(self.wdir / "last.pt", epoch, metrics, fi)
                if improved:
                    self.save(self.wdir / "best.pt", epoch, metrics, fi)
            self.state.epochs_done = epoch
            if stop:
                LOGGER.info("early stop: no improvement in the last %d epochs; best fitness %.4f at epoch %d",
                            patience, self.state.best_fitness, self.state.best_epoch)
        return bool(_broadcast(stop, self.env))

    def validate(self) -> dict[str, float]:
        from kapao.predict import Predictor
        from kapao.val import validate

        predictor = Predictor.from_model(self.ema.module, self.device, half=self.device.type == "cuda", fold_bn=True,
                                         settings=VAL_SETTINGS)  # folding works on a copy: the EMA is untouched
        result = validate(predictor, self.val_loader, progress=True, keep=4 if self.args.plots else 0)
        LOGGER.info("val: AP %.4f, AP50 %.4f (%d images, %d poses)", result.metrics.get("AP", 0.0),
                    result.metrics.get("AP50", 0.0), result.images, result.poses)
        if self.args.plots and result.predictions:
            _plot(draw_predictions, result.predictions, self.cfg.schema, self.run_dir / "val_pred.jpg")
        return result.metrics

    def checkpoint_extra(self, epoch: int, metrics: Mapping[str, float], fi: float | None) -> dict[str, Any]:
        return {"epoch": epoch, "best_fitness": self.state.best_fitness, "best_epoch": self.state.best_epoch,
                "fitness": fi, "metrics": dict(metrics), "ema_updates": self.ema.updates,
                "model": unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "train_args": self.args.to_dict(),
                "hyp": self.hyp.to_dict(), "dataset": self.cfg.to_dict()}

    def save(self, path: Path, epoch: int, metrics: Mapping[str, float], fi: float | None) -> None:
        from kapao.weights import save_checkpoint

        for name, m in (("model", unwrap(self.model)), ("EMA model", self.ema.module)):
            if not all(bool(torch.isfinite(t).all()) for t in m.state_dict().values() if t.is_floating_point()):
                raise NonFiniteLoss(f"the {name} weights became NaN/inf in epoch {epoch}: training diverged; lower "
                                    f"lr0 (--hyp) or check the data. {path} was not overwritten.")
        save_checkpoint(path, self.ema.module, extra=self.checkpoint_extra(epoch, metrics, fi))

    def save_interrupted(self) -> None:
        """Ctrl-C: save the current weights as last.pt, counted as the last completed epoch, so that
        resume redoes the interrupted epoch (from these weights) with its own lr."""
        path = self.wdir / "last.pt"
        try:
            self.save(path, self.state.epochs_done, {}, None)
        except KapaoError as e:
            LOGGER.warning("interrupted; last.pt not updated: %s", e)
            return
        LOGGER.warning("interrupted: saved %s (completed epochs: %d); continue with --resume %s",
                       path, self.state.epochs_done + 1, self.run_dir)

    def record(self, epoch: int, losses: list[float], metrics: Mapping[str, float], fi: float | None) -> None:
        row = {"epoch": epoch, **{f"train/{k}": v for k, v in zip(LOSS_NAMES, losses)},
               **{f"metrics/{k}": metrics.get(k, "") for k in self.metric_names},
               "fitness": "" if fi is None else fi,
               **{f"lr/{g['name']}": g["lr"] for g in self.optimizer.param_groups}}
        self.csv_rows.append(row)
        write_results(self.csv_rows, self.run_dir / "results.csv")
        if self.args.plots:
            _plot(plot_results, self.run_dir / "results.csv", self.run_dir / "results.png")

    def _metric_names(self) -> tuple[str, ...]:
        from kapao.evaluate import COCO_METRICS, CROWDPOSE_METRICS
        from kapao.val import protocol_for

        return CROWDPOSE_METRICS if protocol_for(self.val_loader.dataset) == "crowdpose" else COCO_METRICS

    def _previous_rows(self) -> list[dict[str, Any]]:
        """results.csv rows of the epochs before the start epoch (a resumed run rewrites the rest)."""
        path = self.run_dir / "results.csv"
        if not path.exists():
            return []
        with open(path, newline="") as f:
            return [r for r in csv.DictReader(f) if int(r["epoch"]) < self.state.start_epoch]

    def finish(self, epoch: int, seconds: float) -> None:
        n = epoch - self.state.start_epoch + 1
        for path in (self.wdir / "last.pt", self.wdir / "best.pt"):
            strip_checkpoint(path)
        best = self.wdir / "best.pt"
        LOGGER.info("%d epochs completed in %.3f hours. Best fitness %.4f (epoch %d). Weights: %s%s. Results: %s",
                    n, seconds / 3600, self.state.best_fitness, self.state.best_epoch,
                    self.wdir / "last.pt", f", {best}" if best.exists() else "", self.run_dir)

    # -- display -------------------------------------------------------------------------------------
    def _progress(self, epoch: int, mloss: Tensor, instances: int, size: int) -> str:
        mem = (torch.cuda.memory_reserved(self.device) if self.device.type == "cuda" else _rss()) / 1e9
        losses = " ".join(f"{n} {v:.4g}" for n, v in zip(LOSS_NAMES, mloss.tolist()))
        return f"{epoch}/{self.epochs - 1} mem {mem:.3g}G {losses} inst {instances} size {size}"

    def plot_batch(self, i: int, imgs: Tensor, targets: Tensor) -> None:
        from kapao.draw import render_batch

        path = self.run_dir / f"train_batch{i}.jpg"
        if self.args.plots and not path.exists():  # a resumed run keeps the first run's
            _plot(render_batch, imgs, targets, self.cfg.schema, path)


def _plot(fn: Callable[..., Any], *args: Any) -> None:
    """Draw a figure; one that cannot be written (disk full, …) is a warning, never the end of a run."""
    try:
        fn(*args)
    except (KapaoError, OSError) as e:
        LOGGER.warning("plot not written: %s", getattr(e, "strerror", None) or e)


def _rss() -> float:
    try:
        import psutil

        return float(psutil.Process().memory_info().rss)
    except ImportError:  # pragma: no cover - psutil comes with ultralytics
        return 0.0


RESUME_ONLY = ("optimizer", "scaler", "model")  # checkpoint extras only a resume needs


def strip_checkpoint(path: Path) -> None:
    """Drop the resume-only state from a finished run's checkpoint (a third of the size remains)."""
    from kapao.model import KapaoModel
    from kapao.weights import load_checkpoint, save_checkpoint

    if not path.exists():
        return
    ckpt = load_checkpoint(path)
    if any(k in ckpt["extra"] for k in RESUME_ONLY):
        model = KapaoModel.from_config(ckpt["config"])
        model.load_state_dict(ckpt["state_dict"])
        save_checkpoint(path, model, extra={k: v for k, v in ckpt["extra"].items() if k not in RESUME_ONLY})


# ==============================================================================================
# Results files


def write_results(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """results.csv, rewritten whole (a temp file moved into place)."""
    try:
        with atomic_write(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[-1]))
            writer.writeheader()
            for r in rows:
                writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items() if k in rows[-1]})
    except OSError as e:
        raise DataError(f"cannot write {path}: {e.strerror or e}; free disk space (the previous results.csv and "
                        "checkpoints are kept), then continue with --resume") from None


def plot_results(csv_path: Path, out: Path) -> None:
    """results.png: one panel per results.csv column (losses, AP, AP50, fitness, lrs) over epochs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    keys = [k for k in rows[0] if k != "epoch" and (k.startswith(("train/", "lr/")) or k in
                                                      ("metrics/AP", "metrics/AP50", "fitness"))]
    epochs = [int(r["epoch"]) for r in rows]
    cols = 4
    fig, axes = plt.subplots(math.ceil(len(keys) / cols), cols, figsize=(3.2 * cols, 2.6 * math.ceil(len(keys) / cols)),
                             squeeze=False)
    for ax, k in zip(axes.flat, keys):
        pts = [(e, float(r[k])) for e, r in zip(epochs, rows) if r[k] not in ("", None)]
        if pts:
            ax.plot(*zip(*pts), marker=".", linewidth=1.5)
        ax.set_title(k, fontsize=9)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def draw_predictions(predictions: Sequence[tuple[dict[str, Any], Any]], schema: KeypointSchema, path: Path,
                     conf: float = VAL_DRAW_CONF, tile: int = 512) -> Path:
    """A grid of validation images with the predicted poses (score >= conf) drawn."""
    import cv2

    from kapao.augment import resize_long_side
    from kapao.data import load_image
    from kapao.draw import draw_poses

    tiles = []
    for meta, poses in predictions:
        keep = poses.scores >= conf
        img = draw_poses(load_image(meta["path"]), poses.boxes[keep], poses.keypoints[keep], schema,
                         scores=poses.scores[keep], kp_threshold=None)
        img = resize_long_side(img, tile)
        canvas = np.full((tile, tile, 3), 255, np.uint8)
        canvas[:img.shape[0], :img.shape[1]] = img
        tiles.append(canvas)
    cols = min(len(tiles), 2)
    tiles += [np.full_like(tiles[0], 255)] * (-len(tiles) % cols)
    grid = np.vstack([np.hstack(tiles[i:i + cols]) for i in range(0, len(tiles), cols)])
    if not cv2.imwrite(str(path), grid, [cv2.IMWRITE_JPEG_QUALITY, 90]):
        raise DataError(f"cannot write {path}; check that the run folder is writable")
    return path


# ==============================================================================================
# Entry point


def _prepare_run(args: TrainArgs, env: DistEnv) -> tuple[Path, Path | None, TrainArgs]:
    """(run folder, checkpoint to resume or None, args with --weights resolved to a file), decided on
    rank 0 (which also downloads named weights once) and shared with the others."""
    from kapao.runtime import increment_run_dir
    from kapao.weights import resolve_weights

    decided: tuple[str, str | None, str | None] | None = None
    if env.main:
        if args.resume not in (None, False):
            run_dir, last = resolve_resume(args.resume, args.project)
            decided = (str(run_dir), str(last), None)
        else:
            weights = str(resolve_weights(args.weights)[0]) if args.weights else None
            decided = (str(increment_run_dir(args.project, args.name, args.exist_ok)), None, weights)
    run_dir, last, weights = _broadcast(decided, env)
    return Path(run_dir), (Path(last) if last else None), dataclasses.replace(args, weights=weights or args.weights)


def _write_run_files(trainer: Trainer) -> None:
    try:
        (trainer.run_dir / "weights").mkdir(parents=True, exist_ok=True)
        for name, data in (("args.yaml", trainer.args.to_dict()), ("hyp.yaml", trainer.hyp.to_dict())):
            with atomic_write(trainer.run_dir / name, "w") as f:  # a resumed run rewrites them
                yaml.safe_dump(data, f, sort_keys=False)
    except OSError as e:
        raise DataError(f"cannot write into the run folder {trainer.run_dir}: {e.strerror or e}; free disk space "
                        "or use --project with a writable folder") from None


def train(args: TrainArgs) -> Path:
    """Train (or resume) a KAPAO model; returns the run folder. Works under torchrun (one call per process).

    Raises KapaoError subclasses for user errors (data not found, bad options, diverged training);
    KeyboardInterrupt is re-raised after last.pt was saved.
    """
    from kapao.weights import load_checkpoint

    env = DistEnv.from_environ()
    setup_logging(verbose=LOGGER.getEffectiveLevel() <= logging.DEBUG, main_process=env.main)
    device = _init_device(args, env)
    if args.resume in (None, False) and env.main:  # a missing dataset fails before a run folder is made
        cfg = load_dataset_config(args.data)
        for split in ("train", "val"):
            cfg.require(split)
    run_dir = None
    try:
        run_dir, last, args = _prepare_run(args, env)
        ckpt = None
        if last is not None:
            ckpt = load_checkpoint(last)
            resumed = TrainArgs.from_dict(ckpt["extra"].get("train_args") or {})
            args = dataclasses.replace(resumed, resume=str(last), device=args.device, workers=args.workers)
            if resumed.epochs is not None and int(ckpt["extra"]["epoch"]) + 1 >= resumed.epochs:
                raise KapaoError(f"{last} has finished all {resumed.epochs} epochs; nothing to resume (start a new "
                                 "run with --weights to train further)")
        if env.main:
            LOGGER.info("%s %s", "resuming run" if ckpt else "run folder:", run_dir)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        trainer = Trainer(args, run_dir, device, env, ckpt)
        del ckpt
        if env.main:
            _write_run_files(trainer)
        return trainer.fit()
    except BaseException:
        if env.main and run_dir is not None and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # a run that failed while setting up leaves no empty folder behind
        raise
    finally:
        if env.distributed and dist.is_initialized():
            dist.destroy_process_group()
