"""Training figures (kapao.train.plots): results.png, val_pred.jpg, train_batch*.jpg, and failures that warn."""
from __future__ import annotations

import logging

import cv2
import pytest
import torch

from kapao.cfg.dataset import load_dataset_config
from kapao.errors import DataError
from kapao.poses import Poses
from kapao.train.log import ResultsLog
from kapao.train.plots import VAL_DRAW_CONF, draw_predictions, plot_results, plot_train_batch, safe_plot


def test_plot_results(tmp_path):
    log = ResultsLog(tmp_path / "results.csv", ("AP", "AP50", "AR"))
    for epoch in range(3):
        log.append(epoch, [1.0 / (epoch + 1)] * 4, {"AP": 0.1 * epoch, "AP50": 0.2 * epoch} if epoch else {},
                   None, {"bn": 0.01, "weight": 0.01, "bias": 0.1})
    plot_results(log.path, tmp_path / "results.png")
    img = cv2.imread(str(tmp_path / "results.png"))
    assert img is not None and img.shape[1] == round(3.2 * 4 * 120)  # 4 panels a row at 120 dpi


def _poses(scores):
    n = len(scores)
    boxes = torch.tensor([[10.0, 10.0, 200.0, 300.0]] * n)
    kpts = torch.cat([torch.full((n, 17, 2), 50.0), torch.ones(n, 17, 1)], 2)
    return Poses(boxes, torch.tensor(scores), kpts)


def test_draw_predictions_grid(coco_mini, tmp_path):
    schema = load_dataset_config("coco").schema
    paths = sorted((coco_mini / "images").iterdir())[:3]
    preds = [({"path": str(p)}, _poses([0.9, VAL_DRAW_CONF / 2])) for p in paths]
    out = draw_predictions(preds, schema, tmp_path / "val_pred.jpg", tile=64)
    assert cv2.imread(str(out)).shape == (128, 128, 3)  # 3 tiles in 2 columns, one blank
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="cannot write .* is a file, not a folder"):
        draw_predictions(preds, schema, tmp_path / "file" / "val_pred.jpg", tile=64)


def test_train_batch_is_written_once_and_failures_only_warn(tmp_path, caplog):
    schema = load_dataset_config("coco").schema
    imgs = torch.zeros(2, 3, 64, 64, dtype=torch.uint8)
    targets = torch.zeros(0, 6 + 3 * 17)
    path = tmp_path / "train_batch0.jpg"
    plot_train_batch(imgs, targets, schema, path)
    first = path.stat().st_mtime_ns
    plot_train_batch(imgs + 255, targets, schema, path)  # a resumed run keeps the first run's image
    assert path.stat().st_mtime_ns == first

    def disk_full(*_):
        raise OSError(28, "No space left on device")

    with caplog.at_level(logging.WARNING, logger="kapao"):
        safe_plot(disk_full, path)
    assert "plot not written: No space left on device" in caplog.text


def test_results_figure_has_whole_epoch_axes(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import csv as csv_module

    import matplotlib.pyplot as plt

    from kapao.train.plots import results_figure

    log = ResultsLog(tmp_path / "results.csv", ("AP", "AP50"))
    for epoch in range(3):
        log.append(epoch, [1.0] * 4, {"AP": 0.1, "AP50": 0.2}, 0.1, {"bn": 0.01})
    with open(log.path, newline="") as f:
        fig = results_figure(list(csv_module.DictReader(f)))
    panels = [ax for ax in fig.axes if ax.get_title()]
    fig.canvas.draw()
    for ax in panels:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ax.get_xlabel() == "epoch" and ticks and all(float(t).is_integer() for t in ticks)
    assert list(panels[0].lines[0].get_xdata()) == [1, 2, 3]  # counted from 1
    plt.close(fig)


def test_pr_curve_png(tmp_path):
    import numpy as np

    from kapao.train.plots import plot_pr_curve

    oks, recall = np.linspace(0.5, 0.95, 10), np.linspace(0, 1, 101)
    precision = np.clip(1 - recall[None] * oks[:, None], 0, 1)
    precision[-1, 60:] = -1  # undefined beyond the reachable recall
    plot_pr_curve({"oks": oks, "recall": recall, "precision": precision}, tmp_path / "pr_curve.png")
    assert cv2.imread(str(tmp_path / "pr_curve.png")).shape == (480, 600, 3)


def test_coco_evaluation_fills_the_pr_curves(coco_mini):
    import json

    import numpy as np

    from kapao.eval.metrics import evaluate

    data = json.loads((coco_mini / "person_keypoints.json").read_text())
    results = [{"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "score": 1.0}
               for a in data["annotations"] if a["num_keypoints"] > 0]
    pr: dict = {}
    metrics = evaluate(coco_mini / "person_keypoints.json", results, load_dataset_config("coco").schema, "coco", pr=pr)
    assert pr["precision"].shape == (10, 101) and len(pr["oks"]) == 10 and len(pr["recall"]) == 101
    assert metrics["AP"] == pytest.approx(np.mean(pr["precision"][pr["precision"] > -1]), abs=1e-6)
