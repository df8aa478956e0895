"""Device parsing, incrementing run folders and atomic file writes."""
from __future__ import annotations

import errno
import os
import stat
import sys
import types
from pathlib import Path

import pytest
import torch

from kapao.errors import ConfigError
from kapao.runtime import (
    atomic_write,
    check_writable,
    cpu_bf16,
    cpu_count,
    cpu_flags,
    increment_run_dir,
    select_device,
)


def test_bf16_read_from_the_cpu_flags():
    assert cpu_bf16({"avx512f", "avx512_bf16"}) and cpu_bf16({"amx_bf16"}) and not cpu_bf16({"avx512f", "avx2"})
    assert isinstance(cpu_flags(), frozenset) and cpu_bf16() == cpu_bf16(cpu_flags())


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


def test_atomic_write_replaces_the_file_with_plain_permissions(tmp_path: Path):
    path = tmp_path / "sub" / "results.json"  # missing folders are made
    with atomic_write(path, "w") as f:
        f.write("é")
    old = os.umask(0o027)
    try:
        with atomic_write(path) as f:
            f.write(b"new")
    finally:
        os.umask(old)
    assert path.read_bytes() == b"new" and os.listdir(path.parent) == ["results.json"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # 0o666 less the umask, not mkstemp's 0o600


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_atomic_write_failure_keeps_the_old_file(tmp_path: Path, failure: BaseException):
    path = tmp_path / "last.pt"
    path.write_bytes(b"old")
    with pytest.raises(type(failure)):
        with atomic_write(path) as f:
            f.write(b"half of the new")
            raise failure
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["last.pt"]


def test_atomic_write_check_rejects_before_replacing(tmp_path: Path):
    path = tmp_path / "w.pt"

    def check(tmp: Path) -> None:
        assert tmp.parent == tmp_path and tmp.name.startswith(".w.pt.") and tmp.name.endswith(".part")
        assert tmp.read_bytes() == b"data"  # complete and flushed
        raise ValueError("not usable")

    with pytest.raises(ValueError, match="not usable"):
        with atomic_write(path, suffix=".part", check=check) as f:
            f.write(b"data")
    assert os.listdir(tmp_path) == []


def test_check_writable_leaves_nothing(tmp_path: Path):
    check_writable(tmp_path / "a" / "x.onnx")
    assert os.listdir(tmp_path / "a") == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError):
        check_writable(tmp_path / "file" / "x.onnx")


def test_plain_data_converts_to_weights_only_types_and_names_the_culprit(tmp_path: Path):
    import numpy as np

    from kapao.runtime import plain_data

    src = {"epoch": np.int64(3), "lr": np.float32(0.5), "ok": np.bool_(True), "path": tmp_path / "a",
           "arr": np.arange(3), "t": torch.ones(2, requires_grad=True), "nested": [1, ("x", None)],
           "module": torch.nn.Linear(2, 1)}
    out = plain_data(src, "extra")
    assert type(out["epoch"]) is int and out["epoch"] == 3
    assert type(out["lr"]) is float and type(out["ok"]) is bool
    assert out["path"] == str(tmp_path / "a") and out["nested"] == [1, ("x", None)]
    assert torch.equal(out["arr"], torch.arange(3)) and not out["t"].requires_grad
    assert set(out["module"]) == {"weight", "bias"}
    assert type(src["epoch"]) is np.int64  # the input is not modified
    with pytest.raises(TypeError, match=r"extra\['a'\]\[1\] is a builtins.object"):
        plain_data({"a": [1, object()]}, "extra")
    with pytest.raises(TypeError, match=r"extra has a key \(1, 2\) of type tuple"):
        plain_data({(1, 2): 0}, "extra")


def test_cpu_count_counts_the_affinity_mask_and_caps_at_physical_cores(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setitem(sys.modules, "psutil", types.SimpleNamespace(cpu_count=lambda logical=True: 2))
    assert cpu_count() == 4 and cpu_count(physical=True) == 2  # hyper-threads count for workers, not for convs
    monkeypatch.setitem(sys.modules, "psutil", types.SimpleNamespace(cpu_count=lambda logical=True: 8))
    assert cpu_count(physical=True) == 4  # never more than the process may use
    monkeypatch.setitem(sys.modules, "psutil", None)  # psutil not installed: every allowed CPU counts
    assert cpu_count(physical=True) == 4
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # no affinity mask (macOS, Windows)
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert cpu_count() == 1 and cpu_count(physical=True) == 1
