"""Runtime backends: the torch backend, choosing a backend, and the interface the Predictor relies on."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import kapao.backends.dispatch as fb
import kapao.backends.runtimes as kb
from kapao.backends.dispatch import RuntimeSpec, load_backend
from kapao.backends.precision import PrecisionError
from kapao.backends.runtimes import Backend, BackendInfo, TorchBackend
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
    backend = load_backend(model, RuntimeSpec("cpu"))
    assert isinstance(backend, TorchBackend) and isinstance(backend, Backend)
    assert backend.fixed_shape is None and not backend.half and backend.device == CPU
    assert backend.info == BackendInfo("torch", "fp32", CPU) and backend.info.details == {}
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


def test_the_info_is_typed_and_frozen(model: torch.nn.Module, tmp_path: Path):
    from kapao.weights.checkpoint import save_checkpoint

    path = tmp_path / "tiny.pt"
    save_checkpoint(path, model, extra={"epoch": 3})
    info = load_backend(path, RuntimeSpec("cpu", backend="torch-cl")).info
    assert (info.runtime, info.precision, info.device, info.path, info.format) == ("torch-cl", "fp32", CPU, str(path),
                                                                                  "kapao")
    assert info.name is None and info.exported is None and info.dynamic and not info.int8
    assert info.details["epoch"] == 3 and info.details["schema"] == model.schema
    with pytest.raises(AttributeError):
        info.path = "other.pt"  # type: ignore[misc]
    with pytest.raises(TypeError):
        info.details["epoch"] = 4  # type: ignore[index]


class _Recording:
    """A file backend as another runtime would be: the Backend attributes and a call, here over torch."""

    def __init__(self, inner: TorchBackend, path: str) -> None:
        self.inner, self.calls = inner, []
        self.schema, self.device, self.half = inner.schema, inner.device, inner.half
        self.fixed_shape = (128, 128)
        self.info = BackendInfo("recording", path=path, format="recording", fixed_shape=self.fixed_shape)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        return self.inner(x)


def test_a_new_file_backend_needs_no_predictor_change(model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch):
    made: list[_Recording] = []

    def make(weights, device, half, fold_bn):
        made.append(_Recording(TorchBackend(model, device, half, fold_bn), str(weights)))
        return made[-1]

    row = fb.Runtime("recording", files=(".rec",), cached=False, precisions=("fp32",), devices=(), packages=(),
                     build=make)
    monkeypatch.setattr(fb, "RUNTIMES", (*fb.RUNTIMES, row))  # a new runtime: one new row
    api = KAPAO("model.rec", device="cpu")
    assert made and api.backend is made[0] and api.info.format == "recording" and api.info.runtime == "recording"
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
    backend = load_backend(path, RuntimeSpec("cpu"))
    assert isinstance(backend, kb.OnnxBackend) and isinstance(backend, Backend)
    assert backend.fixed_shape == (128, 128) and not backend.half and backend.schema == model.schema
    assert backend.info.path == str(path) and backend.info.format == "kapao-onnx"  # the metadata's own
    assert backend.info == BackendInfo("onnxruntime", "fp32", CPU, path=str(path), format="kapao-onnx",
                                       exported=str(path), fixed_shape=(128, 128), details=backend.meta.raw)
    assert backend.meta == kb.read_metadata(path)
    # --half asks CUDA first; on a CUDA device (onnxruntime here falls back to the CPU) the file must be fp16
    with pytest.raises(PrecisionError, match=r"^--half: .* is an fp32 ONNX model; export it with --half"):
        load_backend(path, RuntimeSpec(torch.device("cuda", 0), half=True))
