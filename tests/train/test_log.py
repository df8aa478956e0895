"""results.csv and the progress line (kapao.train.log)."""
from __future__ import annotations

import csv

import pytest
import torch

from kapao.errors import DataError
from kapao.eval.metrics import COCO_METRICS
from kapao.train.log import LOSS_NAMES, ResultsLog, progress_text, read_results, write_results

LRS = {"bn": 0.01, "weight": 0.01, "bias": 0.05}


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_results_log_columns_and_values(tmp_path):
    log = ResultsLog(tmp_path / "results.csv", COCO_METRICS)
    log.append(0, [0.1234567, 0.2, 0.3, 0.4], {}, None, LRS)  # an epoch without validation
    log.append(1, [0.1, 0.2, 0.3, 0.4], {"AP": 0.5, "AP50": 0.75}, 0.525, LRS, [0.5, 0.6, 0.7, 0.8])
    rows = _read(tmp_path / "results.csv")
    assert list(rows[0]) == ["epoch", *(f"train/{n}" for n in LOSS_NAMES), *(f"val/{n}" for n in LOSS_NAMES),
                             *(f"metrics/{m}" for m in COCO_METRICS), "fitness", "lr/bn", "lr/weight", "lr/bias"]
    assert rows[0]["val/box"] == "" and rows[1]["val/kp"] == "0.8"  # validation losses of validated epochs only
    assert rows[0]["train/box"] == "0.123457" and rows[0]["metrics/AP"] == "" and rows[0]["fitness"] == ""
    assert rows[1]["metrics/AP50"] == "0.75" and rows[1]["fitness"] == "0.525" and rows[1]["lr/bias"] == "0.05"
    assert rows[1]["metrics/AR"] == ""  # a metric the evaluation did not return stays empty


def test_a_resumed_log_keeps_earlier_epochs_only(tmp_path):
    path = tmp_path / "results.csv"
    log = ResultsLog(path, ("AP",))
    for epoch in range(3):
        log.append(epoch, [1.0] * 4, {"AP": 0.1 * epoch}, None, LRS)
    assert [r["epoch"] for r in read_results(path, 2)] == ["0", "1"]
    resumed = ResultsLog(path, ("AP",), start_epoch=2)  # epoch 2 is redone
    resumed.append(2, [0.5] * 4, {"AP": 0.3}, None, LRS)
    rows = _read(path)
    assert [r["epoch"] for r in rows] == ["0", "1", "2"] and rows[2]["train/kp"] == "0.5"
    assert read_results(tmp_path / "missing.csv", 5) == []


def test_unwritable_results_are_a_one_line_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DataError, match="cannot write .*results.csv.*--resume") as e:
        write_results([{"epoch": 0}], blocker / "results.csv")
    assert "\n" not in str(e.value)


def test_progress_text():
    text = progress_text(3, 10, torch.tensor([0.05, 0.12345, 0.0, 1.5]), 7, 128, torch.device("cpu"))
    assert text.startswith("4/10 mem ") and text.endswith(" box 0.05 obj 0.1235 cls 0 kp 1.5 inst 7 size 128")
