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
from kapao.infer.engine import Predictor
from kapao.infer.predictor import KAPAO
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


def _good_meta() -> dict[str, str]:
    from kapao.backends.onnx_graph import export_metadata
    from kapao.models.network import kapao_n

    return export_metadata(kapao_n(17), (64, 64), dynamic=False, half=False, batch=1, opset=17)


@pytest.mark.parametrize("key, value, phrase", [
    ("format_version", "abc", "metadata format_version is 'abc', not an integer version"),
    ("format_version", "-1", "not an integer version"),
    ("format_version", "true", "not an integer version"),
    ("format_version", "99", "metadata format_version is 99: exported by a newer kapao"),
    ("schema", "[" * 100_000 + "]" * 100_000, "larger than 65536 characters"),
    ("schema", "[" * 5000 + "]" * 5000, "nests deeper than 8 levels"),
    ("schema", '{"names": ' + "[" * 20 + "]" * 20 + "}", "nests deeper than 8 levels"),
    ("schema", "{", "metadata schema is '{', not a keypoint schema"),
    ("schema", "[]", "not a keypoint schema"),
    ("schema", '{"kpt_names": "x"}', "metadata schema is not a valid keypoint schema"),
    ("imgsz", "[64]", "metadata imgsz is '[64]', not [height, width] in pixels"),
    ("imgsz", "[64, -1]", "not [height, width]"),
    ("imgsz", "[64.5, 64]", "not [height, width]"),
    ("imgsz", "[1e9, 64]", "not [height, width]"),
    ("batch", "0", "not a positive batch size"),
    ("batch", '"1"', "not a positive batch size"),
    ("stride", "7", "not a stride of 8, 16, 32 or 64"),
    ("dynamic", "maybe", "metadata dynamic is 'maybe', not true or false"),
    ("half", "1", "not true or false"),
    ("num_keypoints", "5", "metadata num_keypoints is 5, but its schema names 17"),
    ("num_keypoints", "x", "not an integer"),
], ids=lambda v: v[:24] if isinstance(v, str) else v)
def test_every_onnx_metadata_field_is_validated(key, value, phrase):
    """Hostile metadata (a K, version or depth kapao never writes) is named: "FILE: metadata X is ..."."""
    from kapao.backends.runtimes import parse_metadata
    from kapao.errors import WeightsError

    meta = {**_good_meta(), key: value}
    with pytest.raises(WeightsError) as e:
        parse_metadata(meta, where="m.onnx")
    msg = str(e.value)
    assert msg.startswith("m.onnx") and phrase in msg and len(msg.splitlines()) == 1, msg
    assert parse_metadata(_good_meta()).imgsz == (64, 64)


@pytest.mark.parametrize("out_shape", [[1, 3, 64, 64], [1, 10, 56], [1, 10, 6 + 3 * 5], [1, 570]])
def test_an_onnx_graph_that_is_no_kapao_head_of_its_schema_is_named(tmp_path, out_shape):
    """Valid kapao metadata on a graph whose output does not fit K: refused on load, naming both."""
    import onnx
    from onnx import TensorProto, helper

    from kapao.backends.onnx_graph import set_metadata
    from kapao.backends.runtimes import OnnxBackend
    from kapao.errors import WeightsError

    inp = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 64, 64])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, out_shape)
    shape = helper.make_tensor("shape", TensorProto.INT64, [len(out_shape)], out_shape)
    n = int(np.prod(out_shape))
    nodes = [helper.make_node("Flatten", ["images"], ["flat"], axis=0),
             helper.make_node("Slice", ["flat", "zero", "n", "one"], ["cut"]) if n <= 3 * 64 * 64 else None,
             helper.make_node("Reshape", ["cut", "shape"], ["out"])]
    consts = [helper.make_tensor(k, TensorProto.INT64, [1], [v]) for k, v in (("zero", 0), ("n", n), ("one", 1))]
    graph = helper.make_graph([x for x in nodes if x is not None], "g", [inp], [out], initializer=[shape, *consts])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    set_metadata(model, _good_meta())
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    with pytest.raises(WeightsError, match=r"m.onnx: metadata schema has 17 keypoints, so the graph must output "
                                           r"\(B, N, 57\)") as e:
        OnnxBackend(path)
    assert str(out_shape) in str(e.value) and len(str(e.value).splitlines()) == 1
