"""Figures of a training run: results.png (results.csv over epochs), val_pred.jpg (validation images
with their predicted poses) and train_batch*.jpg (the first augmented batches, via kapao.draw)."""
from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np
from torch import Tensor

from kapao.cfg.schema import KeypointSchema
from kapao.data.letterbox import resize_long_side
from kapao.data.sources import load_image
from kapao.draw import draw_poses, render_batch, write_image
from kapao.errors import KapaoError

LOGGER = logging.getLogger(__name__)

VAL_DRAW_CONF = 0.25  # poses above this score are drawn in val_pred.jpg
VAL_TILE = 512  # px: each validation image is fitted into a square tile of this side


def safe_plot(fn: Callable[..., Any], *args: Any) -> None:
    """Draw a figure; one that cannot be written (disk full, …) is a warning, never the end of a run."""
    try:
        fn(*args)
    except (KapaoError, OSError) as e:
        LOGGER.warning("plot not written: %s", getattr(e, "strerror", None) or e)


def plot_results(csv_path: Path, out: Path) -> None:
    """results.png: one panel per results.csv column (losses, AP, AP50, fitness, lrs) over epochs."""
    import matplotlib  # deferred: heavy, and only needed when plots are on

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
                     conf: float = VAL_DRAW_CONF, tile: int = VAL_TILE) -> Path:
    """A grid (2 columns) of validation images with the predicted poses (score >= conf) drawn.

    predictions: (image meta with its "path", postprocess.Poses in original-image pixels) pairs.
    """
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
    return write_image(path, grid, [cv2.IMWRITE_JPEG_QUALITY, 90])


def plot_train_batch(imgs: Tensor, targets: Tensor, schema: KeypointSchema, path: Path) -> None:
    """train_batchN.jpg: imgs (B, 3, H, W) uint8 with their targets (M, 6 + 3K) drawn; a resumed run
    keeps the first run's file."""
    if not path.exists():
        safe_plot(render_batch, imgs, targets, schema, path)
