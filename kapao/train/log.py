"""What a training run reports: the progress-bar line of each batch and results.csv (one row per
epoch: mean training losses, validation losses and metrics, fitness, the lr of each optimizer group)."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from kapao.errors import DataError
from kapao.runtime import atomic_write

LOSS_NAMES = ("box", "obj", "cls", "kp")


def write_results(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """results.csv, rewritten whole (a temp file moved into place); the last row names the columns."""
    try:
        with atomic_write(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[-1]))
            writer.writeheader()
            for r in rows:
                writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items() if k in rows[-1]})
    except OSError as e:
        raise DataError(f"cannot write {path}: {e.strerror or e}; free disk space (the previous results.csv and "
                        "checkpoints are kept), then continue with --resume") from None


def read_results(path: Path, before_epoch: int) -> list[dict[str, Any]]:
    """results.csv rows of the epochs before `before_epoch` (a resumed run rewrites the rest); [] if none."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if int(r["epoch"]) < before_epoch]


class ResultsLog:
    """results.csv of a run: the rows of earlier epochs (kept on resume) plus one appended per epoch."""

    def __init__(self, path: Path, metric_names: Sequence[str], start_epoch: int = 0) -> None:
        self.path, self.metric_names = path, tuple(metric_names)
        self.rows = read_results(path, start_epoch)

    def append(self, epoch: int, losses: Sequence[float], metrics: Mapping[str, float], fi: float | None,
               lrs: Mapping[str, float], val_losses: Sequence[float] = ()) -> None:
        """Add epoch's row (metrics missing from `metrics`, validation losses of an epoch not validated and
        fitness None stay empty) and rewrite the file."""
        row = {"epoch": epoch, **{f"train/{k}": v for k, v in zip(LOSS_NAMES, losses)},
               **{f"val/{k}": (val_losses[i] if val_losses else "") for i, k in enumerate(LOSS_NAMES)},
               **{f"metrics/{k}": metrics.get(k, "") for k in self.metric_names},
               "fitness": "" if fi is None else fi,
               **{f"lr/{name}": lr for name, lr in lrs.items()}}
        self.rows.append(row)
        write_results(self.rows, self.path)


def progress_text(epoch: int, epochs: int, mloss: Tensor, instances: int, size: int, device: torch.device) -> str:
    """The progress-bar description: epoch/epochs (counted from 1, as everywhere on screen), memory (GB), mean
    losses, targets and image size of the batch."""
    mem = (torch.cuda.memory_reserved(device) if device.type == "cuda" else _rss()) / 1e9
    losses = " ".join(f"{n} {v:.4g}" for n, v in zip(LOSS_NAMES, mloss.tolist()))
    return f"{epoch + 1}/{epochs} mem {mem:.3g}G {losses} inst {instances} size {size}"


def _rss() -> float:
    """This process's resident memory in bytes (0 without psutil)."""
    try:
        import psutil  # optional

        return float(psutil.Process().memory_info().rss)
    except ImportError:  # pragma: no cover - psutil comes with ultralytics
        return 0.0
