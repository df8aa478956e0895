"""The `train` verb: the training loop (:class:`Trainer`) and its entry point :func:`train`.

The pieces live beside it: optimizer groups, warmup + cosine schedule and EMA in kapao.train.optim, one batch's
forward/backward and weight update in kapao.train.update, the seeded data order in kapao.train.sampler, DDP in
kapao.train.distributed, results.csv and the progress line in kapao.train.log, figures in kapao.train.plots, and TrainArgs, run
folders, resume and checkpoint stripping in kapao.train.run. fitness = 0.1 AP50 + 0.9 AP of the EMA model; best.pt holds the
fittest epoch. A step never mixes two epochs (the step counter restarts each epoch; the official code carries it over but
zeroes the gradients anyway). Every deliberate difference from the official train.py, with why: docs/DESIGN.md, "Training
deviations".

Checkpoints (``weights/last.pt``, ``weights/best.pt``, via :func:`kapao.weights.save_checkpoint`): the
EMA weights as the model; in ``extra`` the raw model, optimizer, scaler, EMA update count, epoch (the
last completed one), best fitness/epoch, metrics, plain train args, hyp and dataset config. When a run
finishes, optimizer/scaler/raw model are stripped from both files. Ctrl-C saves the current weights as
last.pt under the last completed epoch (resume redoes the interrupted epoch); a NaN/inf loss stops the
run without touching last.pt.

Multi-GPU: every torchrun process calls :func:`train` and validates its share; rank 0 alone logs, plots and saves.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, cast

import torch
from torch import Tensor, nn
from tqdm import tqdm

from kapao.cfg.dataset import load_dataset_config
from kapao.cfg.settings import Hyp
from kapao.data.dataset import PoseDataset
from kapao.distributed import DistEnv, broadcast, close
from kapao.errors import ConfigError, KapaoError
from kapao.eval.metrics import COCO_METRICS, CROWDPOSE_METRICS
from kapao.eval.val import make_val_loader, protocol_for
from kapao.models.loss import KapaoLoss
from kapao.models.network import build_model
from kapao.runtime import RunLock, cpu_count, remove_if_empty, setup_logging
from kapao.train.callbacks import Callbacks, build_callbacks
from kapao.train.distributed import broadcast_weights, init_device, sync_batchnorm, unwrap, wrap_ddp
from kapao.train.log import ResultsLog, progress_text
from kapao.train.optim import (
    ModelEMA,
    accumulate_steps,
    build_optimizer,
    cosine_lf,
    set_epoch_lr,
    set_warmup,
    warmup_iterations,
    warmup_values,
)
from kapao.train.plots import plot_results, plot_train_batch, plot_validation, safe_plot
from kapao.train.run import (
    DEFAULT_SIZE,
    RunState,
    TrainArgs,
    absolute_if_file,
    build_hyp,
    default_batch,
    default_epochs,
    fitness,
    load_resume,
    prepare_run,
    resolve_resume,
    strip_checkpoint,
    write_run_files,
)
from kapao.train.sampler import build_train_loader
from kapao.train.update import BatchUpdater, NonFiniteLoss, ValLoss
from kapao.weights.checkpoint import save_checkpoint, transfer_weights
from kapao.weights.detector import DETECTOR_FORMAT, check_detector_size, describe_transfer, detector_transfer
from kapao.weights.loader import load_weights

__all__ = ["RunState", "TrainArgs", "Trainer", "fitness", "resolve_resume", "train"]

LOGGER = logging.getLogger(__name__)

PLOTTED_BATCHES = 3  # train_batch0..2.jpg of the first epoch
VAL_PLOT_IMAGES = 4  # validation images drawn into val_pred.jpg


class Trainer:
    """One training run: set-up in __init__, then :meth:`fit`. Every rank validates; rank 0 alone logs and writes.

    fit: before_train, then per epoch train_epoch (before_epoch, train_batch per batch) and after_epoch
    (validate, log_epoch, save), then after_train.
    """
    model: nn.Module  # the KapaoModel; in DistributedDataParallel under torchrun

    def __init__(self, args: TrainArgs, run_dir: Path, device: torch.device, env: DistEnv,
                 ckpt: Mapping[str, Any] | None = None, callbacks: Iterable[Any] = ()) -> None:
        self.args, self.run_dir, self.device, self.env = args, run_dir, device, env
        self.callbacks = Callbacks([*build_callbacks(args.tensorboard, args.loggers), *callbacks] if env.main else ())
        self.wdir = run_dir / "weights"
        self.cfg = load_dataset_config(args.data, single_cls=args.single_cls)
        for split in ("train", "val"):  # fail before building anything (every rank validates its share)
            self.cfg.require(split)
        # a resume keeps the run's hyperparameters, with the few it may change (load_resume) applied
        self.hyp = Hyp.from_dict({**ckpt["extra"]["hyp"], **args.hyp_overrides}) if ckpt is not None else build_hyp(args)
        self.epochs = int(args.epochs or default_epochs(self.cfg))
        self.amp = bool(args.amp) and device.type == "cuda"
        self.state = RunState()
        self._setup_model()
        if self.args.batch is None:  # the paper's batch where the GPUs allow, decided once (rank 0)
            batch, note = default_batch(self.args.size or DEFAULT_SIZE, args.imgsz, device, env.world_size)
            if env.main:
                LOGGER.info("%s", note)
            self.args = dataclasses.replace(self.args, batch=int(broadcast(batch, env)))
        args = self.args
        assert args.batch is not None  # resolved just above
        if args.batch < env.world_size or args.batch % env.world_size:
            raise ConfigError(f"--batch {args.batch} must be a positive multiple of the number of processes "
                              f"({env.world_size})")
        self.batch = args.batch // env.world_size  # per process
        self.train_loader, self.sampler = build_train_loader(
            self.cfg, self.hyp, args.imgsz, self.batch, args.workers, args.seed, args.cache, env.rank, env.world_size)
        self.nb = len(self.train_loader)
        self._setup_optimization()
        if ckpt is not None:
            self._restore(ckpt)
        if env.distributed:
            self.model = wrap_ddp(self.model, device)
        self.updater = BatchUpdater(self.model, self.loss_fn, self.optimizer, self.scaler, self.ema, device, self.amp,
                                 env.world_size)
        self.val_loader = self._val_loader()
        self.results = ResultsLog(run_dir / "results.csv", self._metric_names(), self.state.start_epoch) \
            if env.main else None

    # -- set-up pieces ---------------------------------------------------------------------------
    def _setup_model(self) -> None:
        """Model (initial weights transferred), its EMA (rank 0) and the loss; resolves args.size."""
        args = self.args
        torch.manual_seed(args.seed)  # the same initial weights on every rank
        init_sd, info = load_weights(args.weights) if args.weights and not args.resume else (None, {})
        if info.get("format") == DETECTOR_FORMAT:
            check_detector_size(info, args.size)
        self.model = model = build_model(args.size or info.get("size") or DEFAULT_SIZE, self.cfg.schema).to(self.device)
        if init_sd is not None:
            self._transfer(init_sd, info)
        self.args = dataclasses.replace(  # as resolved, so that a resume finds the same run anywhere
            args, size=model.size, epochs=self.epochs, data=absolute_if_file(args.data),
            hyp=absolute_if_file(args.hyp), weights=absolute_if_file(args.weights))
        self.ema = ModelEMA(self.model, self.hyp.ema_decay, self.hyp.ema_tau) if self.env.main else None
        # the other ranks validate rank 0's EMA weights, received into a copy of the model
        self.val_copy = copy.deepcopy(self.model).eval() if not self.env.main else None
        self.loss_fn = KapaoLoss(self.model, self.hyp, args.imgsz)

    def _setup_optimization(self) -> None:
        """Accumulation, warmup length, lr schedule, SyncBatchNorm, optimizer and grad scaler."""
        hyp, batch = self.hyp, self.args.batch
        assert batch is not None  # resolved in __init__
        self.accumulate = accumulate_steps(hyp, batch, self.nb)
        if self.accumulate < accumulate_steps(hyp, batch):
            LOGGER.warning("only %d batches per epoch: accumulating %d instead of %d batches per step (nominal "
                           "batch %d); lower hyp nominal_batch to match", self.nb, self.accumulate,
                           accumulate_steps(hyp, batch), hyp.nominal_batch)
        self.nw = warmup_iterations(hyp, self.nb)
        self.lf = cosine_lf(self.epochs, hyp.lrf)
        if self.args.sync_bn and self.env.distributed:
            self.model = sync_batchnorm(self.model, self.device)
        self.optimizer = build_optimizer(self.model, hyp, batch, self.accumulate)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)

    def _transfer(self, state_dict: Mapping[str, Tensor], info: Mapping[str, Any]) -> None:
        if info.get("format") == DETECTOR_FORMAT:  # the paper's start: the official rule, anchors included
            t = detector_transfer(self.model, state_dict, info)
            if self.env.main:
                LOGGER.info("Transferred %d/%d items from %s%s", t.transferred, t.total, info.get("path"),
                            describe_transfer(info, t))
            return
        n, total = transfer_weights(self.model, state_dict, exclude=("anchors",))
        k = info.get("num_keypoints")
        note = (f" (the weights have {k} keypoints, the data {self.cfg.schema.num_keypoints}: the head starts fresh)"
                if k and k != self.cfg.schema.num_keypoints else "")
        if self.env.main:
            LOGGER.info("transferred %d/%d tensors from %s%s", n, total, info.get("path", self.args.weights), note)
            if n < total // 2:
                LOGGER.warning("fewer than half of the model's tensors matched the weights (model kapao-%s, "
                               "weights kapao-%s); check --size", self.model.size, info.get("size"))

    def _val_loader(self) -> torch.utils.data.DataLoader:
        workers = min(self.args.workers, cpu_count())
        return make_val_loader(self.cfg, "val", self.args.imgsz, self.batch, workers, self.env)

    def _metric_names(self) -> tuple[str, ...]:
        assert self.val_loader is not None  # every rank builds it, on a PoseDataset
        return CROWDPOSE_METRICS if protocol_for(cast(PoseDataset, self.val_loader.dataset)) == "crowdpose" else COCO_METRICS

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
        for g in self.optimizer.param_groups:  # the schedule starts from this run's lr0 (a resume may lower it)
            g["initial_lr"] = self.hyp.lr0
        if extra.get("scaler"):
            self.scaler.load_state_dict(extra["scaler"])
        if self.ema is not None:
            self.ema.module.load_state_dict(ckpt["state_dict"])
            self.ema.updates = int(extra.get("ema_updates", 0))
        self.state = RunState(start_epoch=epoch + 1, best_fitness=float(extra.get("best_fitness", 0.0)),
                              best_epoch=int(extra.get("best_epoch", -1)), epochs_done=epoch)
        if self.env.main:
            LOGGER.info("resuming after epoch %d of %d (%d EMA updates)", epoch + 1, self.epochs,
                        self.ema.updates if self.ema else 0)

    # -- the loop ------------------------------------------------------------------------------------
    def fit(self) -> Path:
        """Train the remaining epochs; returns the run folder. Ctrl-C saves last.pt, then re-raises."""
        t0 = time.time()
        self.before_train()
        epoch = self.state.start_epoch
        try:
            for epoch in range(self.state.start_epoch, self.epochs):
                losses = self.train_epoch(epoch)
                if self.after_epoch(epoch, losses):
                    break
        except KeyboardInterrupt:
            if self.env.main:
                self.save_interrupted()
            raise
        if self.env.main:
            self.after_train(epoch, time.time() - t0)
        return self.run_dir

    def before_train(self) -> None:
        self.callbacks.fire("on_train_start", self)
        if self.env.main:
            LOGGER.info("training %s for %d epochs: imgsz %d, batch %d (x%d processes), accumulate %d, %d batches "
                        "per epoch, %d warmup iterations, %s%s", self.cfg.name, self.epochs, self.args.imgsz,
                        self.batch, self.env.world_size, self.accumulate, self.nb, self.nw, self.device,
                        ", AMP" if self.amp else "")

    def before_epoch(self, epoch: int) -> None:
        """Train mode, this epoch's data order and lr, no gradients left over."""
        self.model.train()
        self.sampler.set_epoch(epoch)
        set_epoch_lr(self.optimizer, self.lf(epoch))
        self.optimizer.zero_grad(set_to_none=True)

    def train_epoch(self, epoch: int) -> list[float]:
        """One pass over the training data; returns the mean box/obj/cls/kp losses."""
        self.before_epoch(epoch)
        mloss = torch.zeros(4, device=self.device)
        accumulate, last_step = self.accumulate, -1
        bar = tqdm(self.train_loader, total=self.nb, disable=not self.env.main, dynamic_ncols=True,
                   bar_format="{l_bar}{bar:10}{r_bar}")
        for i, (imgs, targets, _) in enumerate(bar):
            ni = i + self.nb * epoch  # iterations since the start of training
            if ni <= self.nw:
                accumulate = self.warmup(ni, epoch)
            if self.env.main and self.args.plots and i < PLOTTED_BATCHES and epoch == self.state.start_epoch:
                plot_train_batch(imgs, targets, self.cfg.schema, self.run_dir / f"train_batch{i}.jpg")
            update = i - last_step >= accumulate
            items = self.train_batch(imgs, targets, update, epoch, i)
            if update:
                last_step = i
            mloss = (mloss * i + items) / (i + 1)
            if self.env.main:
                bar.set_description(progress_text(epoch, self.epochs, mloss, len(targets), imgs.shape[-1],
                                                  self.device))
        return [float(v) for v in mloss]

    def warmup(self, ni: int, epoch: int) -> int:
        """Set warmup iteration `ni`'s lrs and momentum; returns its accumulate."""
        assert self.args.batch is not None  # resolved in __init__
        lrs, momentum, accumulate = warmup_values(ni, self.nw, self.hyp.lr0 * self.lf(epoch), self.hyp,
                                                  self.args.batch, self.accumulate)
        set_warmup(self.optimizer, lrs, momentum)
        return accumulate

    def train_batch(self, imgs: Tensor, targets: Tensor, update: bool, epoch: int, i: int) -> Tensor:
        """Forward/backward of batch `i` (then the optimizer step if `update`); returns its loss terms (4,)."""
        try:
            items = self.updater.forward_backward(imgs, targets, sync=update)
        except NonFiniteLoss as e:
            raise NonFiniteLoss(f"{e} at epoch {epoch + 1}, iteration {i}: {self.divergence_advice()}") from None
        if update:
            self.updater.optimizer_step()
        return items

    def divergence_advice(self) -> str:
        """What to do after NaN/inf: resume from last.pt with a lower lr0 where one exists, else start again.
        (The annotations were validated when loaded, so the cause is the optimisation, not NaN labels.)"""
        lower = f"--hyp-set lr0={self.hyp.lr0 / 10:g}"
        last = self.wdir / "last.pt"
        if last.is_file():
            return (f"training diverged; {last} (the last good epoch) is kept: continue with "
                    f"`kapao train --resume {self.run_dir} {lower}`")
        return (f"training diverged before any epoch was saved (no last.pt yet); start again with a lower lr0 "
                f"({lower}) or a smaller --batch")

    # -- end of epoch: validation, results, checkpoints ------------------------------------------------
    def after_epoch(self, epoch: int, losses: list[float]) -> bool:
        """Validate (every rank its share), log and save (rank 0); returns True when training should stop
        (on every rank)."""
        final = epoch + 1 == self.epochs
        metrics = self.validate() if (not self.args.noval or final) else {}
        stop = self._evaluate_and_save(epoch, losses, metrics) if self.env.main else False
        return bool(broadcast(stop, self.env))

    def _evaluate_and_save(self, epoch: int, losses: list[float], metrics: dict[str, float]) -> bool:
        """Rank 0's end of an epoch; returns True to stop early (patience exhausted)."""
        final = epoch + 1 == self.epochs
        fi = fitness(metrics) if metrics else None
        if metrics:
            self.callbacks.fire("on_val_end", self, epoch, metrics)
        improved = fi is not None and fi >= self.state.best_fitness
        if improved and fi is not None:
            self.state.best_fitness, self.state.best_epoch = fi, epoch
        self.log_epoch(epoch, losses, metrics, fi)
        patience = self.args.patience
        stop = bool(patience) and fi is not None and epoch - self.state.best_epoch >= patience
        if not self.args.nosave or final or stop:
            self.save(self.wdir / "last.pt", epoch, metrics, fi)
            if improved:
                self.save(self.wdir / "best.pt", epoch, metrics, fi)
        self.state.epochs_done = epoch
        if stop:
            LOGGER.info("early stop: no improvement in the last %d epochs; best fitness %.4f at epoch %d",
                        patience, self.state.best_fitness, self.state.best_epoch + 1)
        return stop

    def validate(self) -> dict[str, float]:
        """COCO/CrowdPose metrics and the losses of the EMA model on the val split (and its figures) on rank 0;
        every rank predicts its share of the batches with rank 0's EMA weights, the others return {}."""
        model = self.ema.module if self.ema is not None else self.val_copy
        assert model is not None and self.val_loader is not None  # the EMA on rank 0, its copy elsewhere
        broadcast_weights(model, self.env)
        loss = ValLoss(model, self.loss_fn, self.device, self.device.type == "cuda")
        result, self.val_losses = loss.validate(self.val_loader, VAL_PLOT_IMAGES if self.args.plots else 0, env=self.env)
        if result is None:
            return {}
        LOGGER.info("val: AP %.4f, AP50 %.4f (%d images, %d poses)", result.metrics.get("AP", 0.0),
                    result.metrics.get("AP50", 0.0), result.images, result.poses)
        if self.args.plots:
            plot_validation(result, self.cfg.schema, self.val_loader.dataset, self.run_dir)
        return result.metrics

    def log_epoch(self, epoch: int, losses: list[float], metrics: Mapping[str, float], fi: float | None) -> None:
        """Append the epoch to results.csv (and redraw results.png)."""
        assert self.results is not None  # rank 0 only
        self.results.append(epoch, losses, metrics, fi, {g["name"]: g["lr"] for g in self.optimizer.param_groups},
                            self.val_losses if metrics else ())
        self.callbacks.fire("on_epoch_end", self, epoch, self.results.rows[-1])
        if self.args.plots:
            safe_plot(plot_results, self.results.path, self.run_dir / "results.png")

    def checkpoint_extra(self, epoch: int, metrics: Mapping[str, float], fi: float | None) -> dict[str, Any]:
        assert self.ema is not None  # rank 0 only
        return {"epoch": epoch, "best_fitness": self.state.best_fitness, "best_epoch": self.state.best_epoch,
                "fitness": fi, "metrics": dict(metrics), "ema_updates": self.ema.updates,
                "model": unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "train_args": self.args.to_dict(),
                "hyp": self.hyp.to_dict(), "dataset": self.cfg.to_dict()}

    def save(self, path: Path, epoch: int, metrics: Mapping[str, float], fi: float | None) -> None:
        """Write a checkpoint (EMA weights + resume state); refuses NaN/inf weights, keeping the old file."""
        assert self.ema is not None  # rank 0 only
        for name, m in (("model", unwrap(self.model)), ("EMA model", self.ema.module)):
            if not all(bool(torch.isfinite(t).all()) for t in m.state_dict().values() if t.is_floating_point()):
                raise NonFiniteLoss(f"the {name} weights became NaN/inf in epoch {epoch + 1} ({path} was not "
                                    f"overwritten): {self.divergence_advice()}")
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

    def after_train(self, epoch: int, seconds: float) -> None:
        """Strip the resume-only state from last.pt/best.pt and log the summary."""
        n = epoch - self.state.start_epoch + 1
        for path in (self.wdir / "last.pt", self.wdir / "best.pt"):
            strip_checkpoint(path)
        best = self.wdir / "best.pt"
        best_fit = (f"Best fitness {self.state.best_fitness:.4f} (epoch {self.state.best_epoch + 1})"
                    if self.state.best_epoch >= 0 else "No epoch was validated (no best fitness)")
        LOGGER.info("%d epochs completed in %.3f hours. %s. Weights: %s%s. Results: %s",
                    n, seconds / 3600, best_fit,
                    self.wdir / "last.pt", f", {best}" if best.exists() else "", self.run_dir)
        self.callbacks.fire("on_fit_end", self, self.run_dir)


# ==============================================================================================
# Entry point


def train(args: TrainArgs, callbacks: Iterable[Any] = ()) -> Path:
    """Train (or resume) a KAPAO model; returns the run folder. Works under torchrun (one call per process).
    ``callbacks``: more listeners of the training events (:mod:`kapao.train.callbacks`), on rank 0.

    Raises KapaoError subclasses for user errors (data not found, bad options, diverged training);
    KeyboardInterrupt is re-raised after last.pt was saved.
    """
    env = DistEnv.from_environ()
    setup_logging(verbose=LOGGER.getEffectiveLevel() <= logging.DEBUG, main_process=env.main)
    device = init_device(args.device, env)
    if not args.resuming and env.main:  # a missing dataset fails before a run folder is made
        cfg = load_dataset_config(args.data, single_cls=args.single_cls)
        for split in ("train", "val"):
            cfg.require(split)
    run_dir, lock = None, RunLock(".")  # held (rank 0) once the run folder is known; releasing an unheld one is a no-op
    try:
        run_dir, last, args = prepare_run(args, env)
        lock = RunLock(run_dir).acquire() if env.main else lock  # a second training into this folder is refused
        ckpt = None
        if last is not None:
            ckpt, args = load_resume(last, args)
        if env.main:
            LOGGER.info("%s %s", "resuming run" if ckpt else "run folder:", run_dir)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        trainer = Trainer(args, run_dir, device, env, ckpt, callbacks)
        del ckpt
        if env.main:
            write_run_files(trainer.run_dir, trainer.args, trainer.hyp)
        return trainer.fit()
    except BaseException:
        if env.main:
            remove_if_empty(run_dir)
        raise
    finally:
        lock.release()
        close(env)
