"""The pictures of `kapao val --analyze`: cumulative precision-recall breakdown at OKS 0.5 and 0.75 (the
paper's figure), error kinds per keypoint type as stacked bars, and a gallery of the worst-matched persons
(ground truth left, prediction right) when the images are at hand."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import cv2
import numpy as np

from kapao.cfg.schema import KeypointSchema
from kapao.draw import draw_poses
from kapao.eval.analysis import KINDS
from kapao.eval.breakdown import STEPS, Curves
from kapao.eval.diagnosis import Analysis
from kapao.runtime import atomic_write

LOGGER = logging.getLogger(__name__)
STEP_COLORS = ("#ffffff", "#F2E394", "#F2AE72", "#D96459", "#8C4646", "#4F82BD", "#8063A3", "#2E8B57")  # reference's
KIND_COLORS = ("#1ED88B", "#8C4646", "#D96459", "#F2AE72", "#F2E394")  # good, jitter, inversion, swap, miss
GALLERY_SIZE = 8
TILE = 256  # pixels, height of one side of a gallery entry


def _pyplot() -> Any:
    import matplotlib  # deferred: heavy, and only needed for the pictures

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pr_breakdown(curves: Mapping[str, Curves], oks_thrs: Sequence[float], oks: float, path: Path) -> Path:
    """Precision-recall at one OKS threshold after each cumulative fix, the area between steps filled."""
    plt = _pyplot()
    t = [round(float(x), 2) for x in oks_thrs].index(oks)
    recall = np.linspace(0, 1, 101)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    prev = None
    handles = []
    for step, color in zip(STEPS, STEP_COLORS):
        p = np.clip(curves[step].precision[t], 0, None)
        ax.plot(recall, p, color="k", linewidth=1)
        if prev is not None:
            ax.fill_between(recall, prev, p, where=p >= prev, facecolor=color, interpolate=True)
        label = f"{'original' if step == 'baseline' else 'w/o ' + step.replace('_', ' ')}: {curves[step].ap(t):.3f}"
        handles.append(plt.Rectangle((0, 0), 1, 1, facecolor=color, edgecolor="k", label=label))
        prev = p
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="recall", ylabel="precision",
           title=f"Cumulative error breakdown, OKS {oks:.2f} (area all, maxDets 20)")
    ax.grid(True, alpha=0.4)
    ax.legend(handles=handles[::-1], loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_keypoint_errors(per_keypoint: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    """One horizontal bar per keypoint type, split into the shares of good, jitter, inversion, swap, miss."""
    plt = _pyplot()
    names = [n for n, row in per_keypoint.items() if row["labelled"]]
    fig, ax = plt.subplots(figsize=(8, 0.32 * max(len(names), 4) + 1.2))
    left = np.zeros(len(names))
    for kind, color in zip(KINDS, KIND_COLORS):
        share = np.array([100 * per_keypoint[n][f"{kind}_share"] for n in names])
        ax.barh(names, share, left=left, color=color, edgecolor="k", linewidth=0.4, label=kind)
        left += share
    ax.invert_yaxis()
    ax.set(xlim=(0, 100), xlabel="% of labelled keypoints of matched persons", title="Error kinds per keypoint type")
    ax.legend(ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.12 if names else 0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _crop(img: np.ndarray, box: Sequence[float]) -> np.ndarray:
    x, y, w, h = box
    pad = 0.15 * max(w, h) + 8
    x0, y0 = max(int(x - pad), 0), max(int(y - pad), 0)
    x1, y1 = min(int(math.ceil(x + w + pad)), img.shape[1]), min(int(math.ceil(y + h + pad)), img.shape[0])
    crop = img[y0:y1, x0:x1] if x1 > x0 and y1 > y0 else img
    scale = TILE / crop.shape[0]
    return cv2.resize(crop, (max(int(crop.shape[1] * scale), 1), TILE))


def _entry(img: np.ndarray, gt: Mapping[str, Any], pred: np.ndarray, schema: KeypointSchema, oks: float) -> np.ndarray:
    k = schema.num_keypoints
    x, y, w, h = gt["bbox"]
    box = np.array([[x, y, x + w, y + h]])
    g = draw_poses(img, box, np.asarray(gt["keypoints"], np.float32).reshape(1, k, 3), schema, show_boxes=True,
                   show_scores=False)
    p = draw_poses(img, box, pred.reshape(1, k, 3), schema, show_boxes=False, kp_threshold=None)
    pair = np.hstack([_crop(g, gt["bbox"]), np.full((TILE, 4, 3), 255, np.uint8), _crop(p, gt["bbox"])])
    cv2.putText(pair, f"OKS {oks:.2f}", (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 255), 2, cv2.LINE_AA)
    return pair


def save_gallery(analysis: Analysis, image_dir: Path, schema: KeypointSchema, path: Path,
                 n: int = GALLERY_SIZE) -> Path | None:
    """The `n` analysed persons of lowest OKS with their match, ground truth beside prediction; None when
    no image can be read."""
    worst = sorted(analysis.errors, key=lambda pe: pe.oks)[:n]
    rows = []
    for pe in worst:
        info = analysis.coco_gt.imgs[pe.image_id]
        img = cv2.imread(str(image_dir / info.get("file_name", "")))
        if img is None:
            continue
        rows.append(_entry(img, analysis.coco_gt.anns[pe.gt_id], analysis.detections.keypoints[pe.dt_index], schema,
                           pe.oks))
    if not rows:
        return None
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    ok, buf = cv2.imencode(".jpg", np.vstack(rows))
    with atomic_write(path, "wb") as f:
        f.write(buf.tobytes())
    return path


def save_pictures(analysis: Analysis, save_dir: Path, schema: KeypointSchema, image_dir: Path | None) -> list[Path]:
    """Every picture that can be made, in `save_dir`; returns their paths."""
    oks_thrs = analysis.summary["settings"]["oks_thresholds"]
    out = [plot_pr_breakdown(analysis.curves, oks_thrs, oks, save_dir / f"pr_breakdown_oks{int(oks * 100)}.png")
           for oks in (0.5, 0.75) if oks in oks_thrs]
    out.append(plot_keypoint_errors(analysis.summary["per_keypoint"], save_dir / "keypoint_errors.png"))
    if image_dir is not None and analysis.errors:
        gallery = save_gallery(analysis, image_dir, schema, save_dir / "worst_matches.jpg")
        if gallery is not None:
            out.append(gallery)
    return out
