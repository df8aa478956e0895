"""Device parsing and incrementing run folders."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kapao.errors import ConfigError
from kapao.runtime import increment_run_dir, select_device


def test_select_device_cpu_and_auto():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("spec", ["gpu", "0,x", "cuda:a", "-1"])
def test_select_device_bad_spec(spec):
    with pytest.raises(ConfigError, match="--device"):
        select_device(spec)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_select_device_missing_gpu():
    with pytest.raises(ConfigError, match="no CUDA GPU; use --device cpu"):
        select_device("0")


def test_increment_run_dir(tmp_path: Path):
    a = increment_run_dir(tmp_path / "runs" / "predict")
    b = increment_run_dir(tmp_path / "runs" / "predict")
    c = increment_run_dir(tmp_path / "runs" / "predict")
    assert [p.name for p in (a, b, c)] == ["exp", "exp2", "exp3"]
    assert all(p.is_dir() for p in (a, b, c))
    (tmp_path / "runs" / "predict" / "exp7").mkdir()
    assert increment_run_dir(tmp_path / "runs" / "predict").name == "exp8"
    assert increment_run_dir(tmp_path / "runs" / "predict", "exp", exist_ok=True).name == "exp"
    assert increment_run_dir(tmp_path / "runs" / "predict", "mine").name == "mine"
