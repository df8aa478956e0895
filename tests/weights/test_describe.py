"""What `kapao info` says about weights (kapao.weights.describe): the named-weights table, a checkpoint's
description line by line, and a named weight described without a download."""
from __future__ import annotations

from pathlib import Path

from kapao.models.network import format_model_info, kapao_n, model_info
from kapao.weights import registry
from kapao.weights.checkpoint import save_checkpoint
from kapao.weights.describe import checkpoint_lines, describe_weights, named_weights_table


def test_named_weights_table_has_one_line_per_name():
    lines = list(named_weights_table())
    assert [line.split()[0] for line in lines] == list(registry.REGISTRY)
    assert "63.0 AP" in lines[0] and "imgsz" in lines[0]


def test_a_checkpoint_is_described_with_its_training_record(tmp_path: Path):
    model = kapao_n(17)
    path = save_checkpoint(tmp_path / "run.pt", model, extra={"epoch": 4, "dataset": {"name": "coco-mini"},
                                                              "metrics": {"AP": 0.25, "AP50": 0.5, "note": "x"}})
    lines = list(describe_weights(str(path), 128))
    assert lines[0] == format_model_info(model_info(model, 128))
    assert lines[1:] == [f"weights: {path} (kapao checkpoint)", "trained on: coco-mini, epoch 4",
                         "metrics: AP 0.2500, AP50 0.5000"]  # non-numbers are left out
    assert list(checkpoint_lines({"path": "w.pt", "format": "official", "best_fitness": 0.5})) == \
        ["weights: w.pt (official checkpoint)", "best fitness: 0.5000"]


def test_a_named_weight_is_described_without_a_download(tmp_path: Path, monkeypatch):
    monkeypatch.setenv(registry.DIR_ENV, str(tmp_path / "cache"))
    lines = list(describe_weights("kapao_s_coco", 640))
    assert lines == [registry.REGISTRY["kapao_s_coco"].describe(),
                     "not downloaded yet: `kapao predict/val --weights NAME` downloads it"]
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
