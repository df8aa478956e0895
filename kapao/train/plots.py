"""Figures of a training run: results.png (results.csv over epochs), val_pred.jpg (validation images
with their predicted poses) beside val_labels.jpg (the same images with their ground truth), pr_curve.png
(OKS precision-recall of the last validation) and train_batch*.jpg (the first augmented batches, via kapao.draw)."""
from __future__ import annotations

import csv
import logging
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np
import torch
from torch import Tensor

from kapao.cfg.schema import KeypointSchema
from kapao.data.letterbox import resize_long_side
from kapao.data.sources import load_image
from kapao.draw import draw_poses, render_batch, write_image
from kapao.errors import KapaoError
from kapao.poses import Poses

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
        fig = results_figure(list(csv.DictReader(f)))
    fig.savefig(out, dpi=120)
    plt.close(fig)


def results_figure(rows: Sequence[dict[str, str]]) -> Any:
    """The matplotlib figure of results.png from results.csv rows: x axes in whole epochs counted from 1."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    keys = [k for k in rows[0] if k != "epoch" and (k.startswith(("train/", "val/", "lr/")) or k in
                                                      ("metrics/AP", "metrics/AP50", "fitness"))]
    epochs = [int(r["epoch"]) + 1 for r in rows]  # counted from 1, as on screen
    cols = 4
    fig, axes = plt.subplots(math.ceil(len(keys) / cols), cols, figsize=(3.2 * cols, 2.6 * math.ceil(len(keys) / cols)),
                             squeeze=False)
    for ax, k in zip(axes.flat, keys):
        pts = [(e, float(r[k])) for e, r in zip(epochs, rows) if r[k] not in ("", None)]
        if pts:
            ax.plot(*zip(*pts), marker=".", linewidth=1.5)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs, no 0.5 ticks
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def draw_predictions(predictions: Sequence[tuple[dict[str, Any], Any]], schema: KeypointSchema, path: Path,
                     conf: float = VAL_DRAW_CONF, tile: int = VAL_TILE, kp_threshold: float | None = None) -> Path:
    """A grid (2 columns) of validation images with the predicted poses (score >= conf) drawn.

    predictions: (image meta with its "path", postprocess.Poses in original-image pixels) pairs.
    """
    tiles = []
    for meta, poses in predictions:
        keep = poses.scores >= conf
        img = draw_poses(load_image(meta["path"]), poses.boxes[keep], poses.keypoints[keep], schema,
                         scores=poses.scores[keep], kp_threshold=kp_threshold)
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


def plot_pr_curve(pr: dict[str, Any], out: Path) -> None:
    """pr_curve.png: OKS precision-recall curves of a validation (COCOeval's, see
    :func:`kapao.eval.metrics.evaluate_coco`) at OKS 0.50, 0.75 and 0.95, and their mean over the 10
    thresholds (its area is AP)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    precision = np.where(pr["precision"] < 0, np.nan, pr["precision"])  # -1: no ground truth
    recall, oks = pr["recall"], pr["oks"]
    fig, ax = plt.subplots(figsize=(5, 4))
    for t in (0.5, 0.75, 0.95):
        i = int(np.argmin(np.abs(oks - t)))
        ax.plot(recall, precision[i], linewidth=1, label=f"OKS {oks[i]:.2f}")
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: nothing to average
        mean = np.nanmean(precision, 0)
    ax.plot(recall, mean, linewidth=2.5, color="k", label=f"mean 0.50:0.95 (AP {np.nanmean(mean):.3f})")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.01), title="OKS precision-recall")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def ground_truth_pairs(coco: Any, metas: Sequence[dict[str, Any]], num_keypoints: int) -> list[tuple[dict[str, Any], Poses]]:
    """(meta, Poses of the image's annotated persons, score 1) for each meta: what val_labels.jpg draws."""
    pairs = []
    for meta in metas:
        anns = [a for a in coco.imgToAnns.get(meta["image_id"], []) if not a.get("iscrowd")]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float32).reshape(-1, 4)
        kp = torch.tensor([a.get("keypoints") or [0.0] * 3 * num_keypoints for a in anns],
                          dtype=torch.float32).reshape(-1, num_keypoints, 3)
        kp[..., 2] = (kp[..., 2] > 0).float()  # drawn where labelled
        pairs.append((meta, Poses(boxes, torch.ones(len(anns)), kp)))
    return pairs


def plot_validation(result: Any, schema: KeypointSchema, dataset: Any, run_dir: Path) -> None:
    """The figures of one validation (a :class:`kapao.eval.val.ValResult`): val_pred.jpg, val_labels.jpg
    (the same images with their ground truth, from the split's annotations, ``dataset.coco``) and pr_curve.png."""
    if result.predictions:
        safe_plot(draw_predictions, result.predictions, schema, run_dir / "val_pred.jpg")
        truth = ground_truth_pairs(dataset.coco, [m for m, _ in result.predictions], schema.num_keypoints)
        safe_plot(draw_predictions, truth, schema, run_dir / "val_labels.jpg", 0.0, VAL_TILE, 0.0)
    if result.pr:
        safe_plot(plot_pr_curve, result.pr, run_dir / "pr_curve.png")
