"""Training you can watch: events fired to callbacks, TensorBoard event files by default, optional loggers
that kapao imports only when asked, and figures (val_labels.jpg beside val_pred.jpg, pr_curve.png)."""
from __future__ import annotations

import logging
import sys

import cv2
import pytest

from kapao.errors import ConfigError
from kapao.train.callbacks import EVENTS, Callbacks, TensorBoardLogger, build_callbacks
from kapao.train.trainer import train
from tests.train.test_trainer import _args, _rows


class Recorder:
    def __init__(self):
        self.calls: list[tuple] = []

    def on_train_start(self, trainer):
        self.calls.append(("start", trainer.run_dir.name))

    def on_val_end(self, trainer, epoch, metrics):
        self.calls.append(("val", epoch, round(metrics["AP"], 6)))

    def on_epoch_end(self, trainer, epoch, row):
        self.calls.append(("epoch", epoch, row["train/box"]))

    def on_fit_end(self, trainer, run_dir):
        self.calls.append(("end", run_dir.name))


def test_build_callbacks_imports_a_logger_only_when_asked(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "wandb", None)
    assert [type(c) for c in build_callbacks()] == [TensorBoardLogger]  # mlflow, wandb never touched
    assert build_callbacks(tensorboard=False) == []
    with pytest.raises(ImportError, match=r"^--logger mlflow needs the 'mlflow' package, which is not installed; "
                                          r"pip install 'kapao\[mlflow\]'$"):
        build_callbacks(loggers=["mlflow"])
    with pytest.raises(ConfigError, match="--logger comet: choose one of mlflow, wandb"):
        build_callbacks(loggers=["comet"])


def test_a_failing_callback_is_dropped_with_one_warning(caplog):
    class Broken:
        def on_epoch_end(self, *a):
            raise RuntimeError("server gone")

    rec = Recorder()
    cbs = Callbacks([Broken(), rec])
    with caplog.at_level(logging.WARNING):
        for epoch in range(2):
            cbs.fire("on_epoch_end", None, epoch, {"train/box": 1.0})
    assert caplog.text.count("Broken.on_epoch_end failed (server gone)") == 1
    assert rec.calls == [("epoch", 0, 1.0), ("epoch", 1, 1.0)]
    with pytest.raises(ValueError, match="unknown training event"):
        cbs.fire("on_batch_end")
    assert EVENTS == ("on_train_start", "on_val_end", "on_epoch_end", "on_fit_end")


@pytest.mark.slow
def test_training_fires_events_writes_tensorboard_and_figures(coco_mini_yaml, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rec = Recorder()
    run = train(_args(coco_mini_yaml, tmp_path, epochs=2), callbacks=[rec])
    rows = _rows(run)
    assert rec.calls[0] == ("start", run.name) and rec.calls[-1] == ("end", run.name)
    assert [c[:2] for c in rec.calls[1:-1]] == [("val", 0), ("epoch", 0), ("val", 1), ("epoch", 1)]
    assert [float(c[2]) for c in rec.calls if c[0] == "epoch"] == pytest.approx([float(r["train/box"]) for r in rows])
    events = list(run.glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    assert {"train/box", "val/box", "val/kp", "metrics/AP", "fitness"} <= set(acc.Tags()["scalars"])
    assert all(float(r["val/kp"]) > 0 for r in rows)  # results.csv: validation losses of every validated epoch
    assert [e.step for e in acc.Scalars("train/kp")] == [1, 2]  # epochs counted from 1
    assert [e.value for e in acc.Scalars("train/kp")] == pytest.approx([float(r["train/kp"]) for r in rows], rel=1e-4)
    pred, labels = cv2.imread(str(run / "val_pred.jpg")), cv2.imread(str(run / "val_labels.jpg"))
    assert pred is not None and labels is not None and pred.shape == labels.shape  # the same images, side by side
    assert cv2.imread(str(run / "pr_curve.png")) is not None
    quiet = train(_args(coco_mini_yaml, tmp_path, epochs=1, name="quiet", tensorboard=False, plots=False))
    assert not list(quiet.glob("events.out.tfevents.*")) and not (quiet / "pr_curve.png").exists()
