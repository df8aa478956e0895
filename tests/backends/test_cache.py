"""The exported-model cache: keys, file names, reuse, rebuilding stale or damaged files."""
from __future__ import annotations

import logging
from pathlib import Path

import onnx
import pytest
import torch

import kapao.backends.cache as mc
import kapao.backends.int8 as int8_mod
from kapao.backends.int8 import Int8Calibration
from kapao.models.network import kapao_n

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return kapao_n(5).eval()


def test_cache_dir_env_else_weights_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    assert mc.cache_dir() == tmp_path / "kapao-cache"  # tests/conftest.py sets KAPAO_CACHE_DIR
    monkeypatch.delenv(mc.CACHE_ENV)
    monkeypatch.setenv("KAPAO_WEIGHTS_DIR", str(tmp_path / "w"))
    assert mc.cache_dir() == tmp_path / "w" / "exported"


def test_key_follows_weights_shape_calibration_and_versions(model: torch.nn.Module, coco_mini: Path,
                                                           monkeypatch: pytest.MonkeyPatch):
    digest = mc.weights_digest(model)
    other = kapao_n(5)
    other.load_state_dict(model.state_dict())
    assert mc.weights_digest(other) == digest  # content, not identity
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1e-3
    assert mc.weights_digest(other) != digest
    calib = Int8Calibration.from_spec(coco_mini / "images", 128, 2)
    keys = {mc.cache_key(digest, None), mc.cache_key(digest, (128, 192)), mc.cache_key(digest, (192, 128)),
            mc.cache_key(digest, None, calib), mc.cache_key(mc.weights_digest(other), None)}
    assert len(keys) == 5
    base = mc.cache_key(digest, None)
    monkeypatch.setattr(mc, "_version", lambda p: "9.9" if p == "onnxruntime" else "1")
    assert mc.cache_key(digest, None) != base
    int8_key = mc.cache_key(digest, None, calib)
    monkeypatch.setitem(int8_mod.INT8_RECIPE, "per_channel", False)  # another quantisation recipe: another file
    assert mc.cache_key(digest, None, calib) != int8_key and mc.cache_key(digest, None) == mc.cache_key(digest, None)
    names = {mc.cache_path("w", None, None, base).name, mc.cache_path("w", None, None, mc.cache_key(digest, None)).name}
    assert len(names) == 2 and all(n.startswith("w-dynamic-") and n.endswith(".onnx") for n in names)
    assert mc.cache_path("w", (128, 192), calib, base).name.startswith("w-128x192-int8-")


def test_built_once_then_reused_and_damaged_files_rebuilt(model: torch.nn.Module, caplog: pytest.LogCaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch):
    builds = []
    real = mc.build_onnx
    monkeypatch.setattr(mc, "build_onnx", lambda *a: builds.append(a[2]) or real(*a))
    with caplog.at_level(logging.INFO, logger="kapao"):
        path = mc.cached_onnx(model, "tiny", "onnxruntime", (128, 128))
    assert path.parent == mc.cache_dir() and path.is_file() and len(builds) == 1
    notice = [r.getMessage() for r in caplog.records if "exporting" in r.getMessage()]
    assert notice == [f"exporting tiny to onnxruntime once (a few seconds); cached at {path}"]
    assert mc.stored_key(path) == mc.cache_key(mc.weights_digest(model), (128, 128))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kapao"):
        assert mc.cached_onnx(model, "tiny", "onnxruntime", (128, 128)) == path
    assert len(builds) == 1 and not caplog.records  # reused silently
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated (a crash of some other writer, a full disk)
    assert mc.stored_key(path) is None
    assert mc.cached_onnx(model, "tiny", "onnxruntime", (128, 128)) == path and len(builds) == 2
    assert mc.stored_key(path) == mc.cache_key(mc.weights_digest(model), (128, 128))
    proto = onnx.load(str(path))
    mc.set_metadata(proto, {mc.KEY_METADATA: "stale"})
    path.write_bytes(proto.SerializeToString())
    assert mc.cached_onnx(model, "tiny", "onnxruntime", (128, 128)) == path and len(builds) == 3
    assert mc.stored_key(path) != "stale"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary files left
