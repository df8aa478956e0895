"""Training events and the loggers that listen to them: TensorBoard (on by default), MLflow and Weights &
Biases (asked for by name). kapao imports a logger's package only when that logger is asked for.

A callback is any object with some of these methods (missing ones are skipped), called on rank 0:

- ``on_train_start(trainer)``: once, after set-up (``trainer.run_dir``, ``trainer.args``, ``trainer.hyp``)
- ``on_val_end(trainer, epoch, metrics)``: after each validation (metrics: AP, AP50, …)
- ``on_epoch_end(trainer, epoch, row)``: after each epoch, with its results.csv row (losses, metrics, lrs)
- ``on_fit_end(trainer, run_dir)``: once, after the last epoch (best.pt/last.pt final)

Library users pass their own: ``kapao.train.trainer.train(args, callbacks=[MyLogger()])``. A callback that
raises stops nothing: its error is logged once and it is dropped for the rest of the run.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from kapao.errors import ConfigError
from kapao.runtime import optional_import

LOGGER = logging.getLogger(__name__)

EVENTS = ("on_train_start", "on_val_end", "on_epoch_end", "on_fit_end")
LOGGERS = ("mlflow", "wandb")  # `kapao train --logger NAME`; TensorBoard is on unless --no-tensorboard


def _scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of a results row (empty cells -- metrics of an epoch not validated -- dropped)."""
    return {k: float(v) for k, v in row.items() if k != "epoch" and isinstance(v, (int, float))}


class TensorBoardLogger:
    """TensorBoard event files in the run folder (``tensorboard --logdir runs/train``): every results.csv
    column as a scalar over epochs (step = epoch counted from 1). Needs the ``tensorboard`` package."""

    def __init__(self) -> None:
        optional_import("tensorboard", "TensorBoard logging (or train with --no-tensorboard)")
        self.writer: Any = None

    def on_train_start(self, trainer: Any) -> None:
        from torch.utils.tensorboard import SummaryWriter  # deferred: imports tensorboard

        self.writer = SummaryWriter(log_dir=str(trainer.run_dir))

    def on_epoch_end(self, trainer: Any, epoch: int, row: Mapping[str, Any]) -> None:
        for k, v in _scalars(row).items():
            self.writer.add_scalar(k, v, epoch + 1)
        self.writer.flush()

    def on_fit_end(self, trainer: Any, run_dir: Path) -> None:
        if self.writer is not None:
            self.writer.close()


class MLflowLogger:
    """MLflow: the run's arguments as params, every results column as a metric per epoch, the weights as
    artifacts. Tracking URI and experiment from MLflow's own environment variables."""

    def __init__(self) -> None:
        self.mlflow = optional_import("mlflow", "--logger mlflow")

    def on_train_start(self, trainer: Any) -> None:
        self.mlflow.start_run(run_name=Path(trainer.run_dir).name)
        self.mlflow.log_params({k: str(v) for k, v in trainer.args.to_dict().items()})

    def on_epoch_end(self, trainer: Any, epoch: int, row: Mapping[str, Any]) -> None:
        self.mlflow.log_metrics({k.replace("/", "_"): v for k, v in _scalars(row).items()}, step=epoch + 1)

    def on_fit_end(self, trainer: Any, run_dir: Path) -> None:
        for name in ("best.pt", "last.pt"):
            if (Path(run_dir) / "weights" / name).is_file():
                self.mlflow.log_artifact(str(Path(run_dir) / "weights" / name))
        self.mlflow.end_run()


class WandbLogger:
    """Weights & Biases: the run's arguments as config, every results column per epoch (project kapao)."""

    def __init__(self) -> None:
        self.wandb = optional_import("wandb", "--logger wandb")
        self.run: Any = None

    def on_train_start(self, trainer: Any) -> None:
        self.run = self.wandb.init(project="kapao", name=Path(trainer.run_dir).name, dir=str(trainer.run_dir),
                                   config=trainer.args.to_dict())

    def on_epoch_end(self, trainer: Any, epoch: int, row: Mapping[str, Any]) -> None:
        self.run.log({**_scalars(row), "epoch": epoch + 1})

    def on_fit_end(self, trainer: Any, run_dir: Path) -> None:
        if self.run is not None:
            self.run.finish()


def build_callbacks(tensorboard: bool = True, loggers: Sequence[str] = ()) -> list[Any]:
    """The built-in loggers a run asks for (each package imported here, only when asked)."""
    unknown = [n for n in loggers if n not in LOGGERS]
    if unknown:
        raise ConfigError(f"--logger {unknown[0]}: choose one of {', '.join(LOGGERS)}")
    made: list[Any] = [TensorBoardLogger()] if tensorboard else []
    return made + [{"mlflow": MLflowLogger, "wandb": WandbLogger}[n]() for n in loggers]


class Callbacks:
    """Fires events at a list of callbacks; a callback that raises is logged once and dropped."""

    def __init__(self, callbacks: Iterable[Any] = ()) -> None:
        self.callbacks = list(callbacks)

    def fire(self, event: str, *args: Any) -> None:
        if event not in EVENTS:
            raise ValueError(f"unknown training event {event!r}; one of {', '.join(EVENTS)}")
        for cb in list(self.callbacks):
            method = getattr(cb, event, None)
            if method is None:
                continue
            try:
                method(*args)
            except Exception as e:  # noqa: BLE001 - a logger's failure must not end a training run
                LOGGER.warning("%s.%s failed (%s); it is off for the rest of the run", type(cb).__name__, event, e)
                self.callbacks.remove(cb)
