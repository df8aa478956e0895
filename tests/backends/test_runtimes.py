"""Runtime backends: the torch backend, choosing a backend, and the interface the Predictor relies on."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import kapao.backends.runtimes as kb
from kapao.backends.runtimes import Backend, TorchBackend, is_onnx, load_backend
from kapao.cfg.schema import HeadLayout
from kapao.cfg.settings import PREDICT_SETTINGS
from kapao.errors import ConfigError
from kapao.infer.predictor import KAPAO, Predictor
from kapao.models.network import kapao_n

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return kapao_n(5).eval()


def test_torch_backend_folds_a_copy_and_decodes(model: torch.nn.Module):
    backend = load_backend(model, "cpu")
    assert isinstance(backend, TorchBackend) and isinstance(backend, Backend)
    assert backend.fixed_shape is None and not backend.half and backend.device == CPU and backend.info == {}
    assert any(hasattr(m, "bn") for m in model.modules())  # the caller's model is not folded
    assert not any(hasattr(m, "bn") for m in backend.model.modules())
    x = torch.rand(2, 3, 128, 192)
    with torch.no_grad():
        out, ref = backend(x), model.eval()(x)[0]
    assert out.shape == ref.shape and out.shape[-1] == HeadLayout(5).num_outputs
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)  # folding changes rounding only
    plain = TorchBackend(model, CPU, fold_bn=False)
    with torch.no_grad():
        assert torch.equal(plain(x), ref)


def test_torch_backend_half_needs_cuda(model: torch.nn.Module):
    with pytest.raises(ConfigError, match="--half needs a CUDA device"):
        TorchBackend(model, CPU, half=True)


def test_is_onnx():
    assert is_onnx("a/b.ONNX") and is_onnx(Path("m.onnx"))
    assert not is_onnx("kapao_s_coco") and not is_onnx("best.pt") and not is_onnx(torch.nn.Identity())


class _Recording:
    """A file backend as another runtime would be: the Backend attributes and a call, here over torch."""

    def __init__(self, inner: TorchBackend, path: str) -> None:
        self.inner, self.calls = inner, []
        self.schema, self.device, self.half = inner.schema, inner.device, inner.half
        self.fixed_shape = (128, 128)
        self.info = {"path": path, "format": "recording"}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        return self.inner(x)


def test_a_new_file_backend_needs_no_predictor_change(model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch):
    made: list[_Recording] = []

    def make(weights, device, half, fold_bn):
        made.append(_Recording(TorchBackend(model, device, half, fold_bn), str(weights)))
        return made[-1]

    monkeypatch.setattr(kb, "FILE_BACKENDS", ((lambda w: str(w).endswith(".rec"), make), *kb.FILE_BACKENDS))
    api = KAPAO("model.rec", device="cpu")
    assert made and api.backend is made[0] and api.info["format"] == "recording"
    assert api.default_imgsz == 128
    with pytest.raises(ConfigError, match="fixed 128x128 input"):
        api.check_imgsz(192)
    img = (np.random.default_rng(0).random((100, 120, 3)) * 255).astype(np.uint8)
    settings = PREDICT_SETTINGS.replace(conf=0.0001)
    got = api.predict(img, imgsz=128, settings=settings)[0]
    want = Predictor.from_model(model, CPU, settings=settings).predict_images([img], 128)[0]
    assert made[0].calls == [(1, 3, 128, 128)]
    assert torch.equal(got.boxes, want.boxes) and torch.equal(got.keypoints, want.keypoints)


def test_onnx_files_get_the_onnx_backend(model: torch.nn.Module, tmp_path: Path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from kapao.export import export_onnx

    path = export_onnx(model, tmp_path / "m.onnx", imgsz=128, check=False)
    backend = load_backend(path, "cpu")
    assert isinstance(backend, kb.OnnxBackend) and isinstance(backend, Backend)
    assert backend.fixed_shape == (128, 128) and not backend.half and backend.schema == model.schema
    assert backend.info["path"] == str(path) and backend.info["format"] == "kapao-onnx"  # the metadata's own
    assert backend.meta == kb.read_metadata(path)
    with pytest.raises(ConfigError, match="is an fp32 ONNX model"):
        load_backend(path, "cpu", half=True)
