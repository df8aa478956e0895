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
