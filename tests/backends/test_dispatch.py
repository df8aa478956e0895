"""Choosing the runtime: --backend auto/torch/torch-cl/onnxruntime/openvino give the same poses."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import kapao.backends.dispatch as fb
from kapao.backends.cache import cache_dir
from kapao.backends.int8 import Int8Calibration
from kapao.backends.runtimes import BackendInfo, OnnxBackend, TorchBackend
from kapao.cfg.schema import HeadLayout
from kapao.cfg.settings import PREDICT_SETTINGS
from kapao.cli.main import cli
from kapao.cli.options import BACKEND_NAMES
from kapao.data.sources import load_image
from kapao.errors import ConfigError
from kapao.infer.predictor import KAPAO, Predictor
from kapao.models.network import kapao_n
from kapao.poses import Poses
from kapao.weights.checkpoint import save_checkpoint

pytest.importorskip("onnxruntime")
CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)
COORD_TOL = 0.05  # pixels: fp32 rounding differences between runtimes, far below a keypoint's size
SCORE_TOL = 1e-4


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "tiny.pt"
    save_checkpoint(path, kapao_n(5).eval(), extra={"epoch": 0})
    return path


def test_cli_choices_are_the_backends():
    assert BACKEND_NAMES == fb.BACKENDS and fb.DEFAULT_CPU_BACKEND in fb.BACKENDS[1:]
    assert fb.DEFAULT_SHAPES in fb.SHAPE_POLICIES


def test_the_table_has_one_row_per_runtime():
    rows = {r.name: r for r in fb.RUNTIMES}
    assert list(rows) == ["torch", "torch-cl", "onnxruntime", "openvino"] == list(fb.BACKENDS[1:])
    assert [r.name for r in fb.RUNTIMES if r.cached] == ["onnxruntime", "openvino"]  # .pt via the export cache
    assert [r.name for r in fb.RUNTIMES if r.files] == ["onnxruntime", "openvino"]  # run .onnx files
    assert [r.name for r in fb.RUNTIMES if "fp16" in r.precisions] == ["torch", "torch-cl"]
    assert [r.name for r in fb.RUNTIMES if "int8" in r.precisions] == ["onnxruntime"] == [fb.INT8_BACKEND]
    assert rows["openvino"].devices == ("cpu",) and not rows["torch"].devices
    assert fb.exported_runtime("a/b.ONNX") is rows["onnxruntime"] and fb.exported_runtime(Path("m.onnx"))
    assert fb.exported_runtime("kapao_s_coco") is None and fb.exported_runtime("best.pt") is None
    assert fb.exported_runtime(torch.nn.Identity()) is None


def test_the_runtime_spec_says_its_precision():
    assert fb.RuntimeSpec().precision == "fp32" and fb.RuntimeSpec(half=True).precision == "fp16"
    assert fb.RuntimeSpec(int8=Int8Calibration((), 128)).precision == "int8"
    with pytest.raises(dataclasses.FrozenInstanceError):
        fb.RuntimeSpec().half = True  # type: ignore[misc]


def test_auto_picks_the_table_choice(weights: Path, monkeypatch: pytest.MonkeyPatch):
    model = kapao_n(5)
    assert fb.choose_runtime("auto", CPU, str(weights)).name == fb.DEFAULT_CPU_BACKEND
    assert fb.choose_runtime("auto", GPU, str(weights)).name == "torch"  # a GPU keeps torch
    assert fb.choose_runtime("auto", CPU, model).name == "torch"  # an in-memory model may still change
    assert fb.choose_runtime("auto", CPU, "m.onnx").name == "onnxruntime"
    assert fb.choose_runtime("auto", CPU, str(weights), int8=True).name == fb.INT8_BACKEND
    for name in fb.BACKENDS[1:]:
        assert fb.choose_runtime(name, CPU, str(weights)).name == name
    with pytest.raises(ConfigError, match="--backend openvino runs on the CPU"):
        fb.choose_runtime("openvino", GPU, str(weights))
    with pytest.raises(ConfigError, match="--int8 runs on onnxruntime"):
        fb.choose_runtime("torch", CPU, str(weights), int8=True)
    with pytest.raises(ConfigError, match="needs .pt weights"):
        fb.choose_runtime("torch-cl", CPU, "m.onnx")
    with pytest.raises(ConfigError, match="choose one of auto, torch"):
        fb.choose_runtime("tensorrt", CPU, str(weights))
    monkeypatch.setattr("kapao.runtime.cpu_flags", lambda: frozenset({"avx2", "avx512f"}))  # a CPU without bf16
    with pytest.raises(ConfigError, match="--half needs a CUDA device"):
        fb.load_backend(str(weights), fb.RuntimeSpec("cpu", half=True))
    monkeypatch.setattr(fb, "installed", lambda backend: False)  # `pip install kapao` without the [onnx] extra
    assert fb.choose_runtime("auto", CPU, str(weights)).name == "torch"


# Today's choices, pinned before the dispatcher became one table: (--backend, device, weights, --int8) ->
# the runtime, or the start of the error. "pt" is a checkpoint path, "model" an in-memory KapaoModel.
CHOICES = [
    ("auto", "cpu", "pt", False, "DEFAULT"), ("auto", "cuda", "pt", False, "torch"),
    ("auto", "cpu", "model", False, "torch"), ("auto", "cuda", "model", False, "torch"),
    ("auto", "cpu", "onnx", False, "onnxruntime"), ("auto", "cuda", "onnx", False, "onnxruntime"),
    ("auto", "cpu", "pt", True, "onnxruntime"), ("auto", "cuda", "pt", True, "onnxruntime"),
    ("auto", "cpu", "model", True, "onnxruntime"), ("auto", "cpu", "onnx", True, "onnxruntime"),
    ("torch", "cpu", "pt", False, "torch"), ("torch", "cuda", "pt", False, "torch"),
    ("torch-cl", "cpu", "model", False, "torch-cl"), ("torch-cl", "cuda", "pt", False, "torch-cl"),
    ("onnxruntime", "cpu", "pt", False, "onnxruntime"), ("onnxruntime", "cuda", "pt", False, "onnxruntime"),
    ("onnxruntime", "cpu", "onnx", False, "onnxruntime"), ("onnxruntime", "cpu", "pt", True, "onnxruntime"),
    ("onnxruntime", "cpu", "model", False, "onnxruntime"),
    ("openvino", "cpu", "pt", False, "openvino"), ("openvino", "cpu", "onnx", False, "openvino"),
    ("openvino", "cpu", "model", False, "openvino"),
    ("openvino", "cuda", "pt", False, "!--backend openvino runs on the CPU"),
    ("openvino", "cuda", "pt", True, "!--backend openvino runs on the CPU"),
    ("openvino", "cpu", "pt", True, "!--int8 runs on onnxruntime"),
    ("torch", "cpu", "pt", True, "!--int8 runs on onnxruntime"),
    ("torch-cl", "cuda", "model", True, "!--int8 runs on onnxruntime"),
    ("torch", "cpu", "onnx", False, "!--backend torch needs .pt weights"),
    ("torch-cl", "cuda", "onnx", False, "!--backend torch-cl needs .pt weights"),
    ("torch", "cpu", "onnx", True, "!--int8 runs on onnxruntime"),
    ("tensorrt", "cpu", "pt", False, "!--backend tensorrt: choose one of auto, torch, torch-cl, onnxruntime, openvino"),
]


@pytest.mark.parametrize(("backend", "device", "kind", "int8", "want"), CHOICES)
def test_the_choice_is_as_before(backend: str, device: str, kind: str, int8: bool, want: str, weights: Path):
    spec = {"pt": str(weights), "model": kapao_n(5), "onnx": "m.onnx"}[kind]
    dev = CPU if device == "cpu" else GPU
    if want.startswith("!"):
        with pytest.raises(ConfigError, match=f"^{re.escape(want[1:])}"):
            fb.choose_runtime(backend, dev, spec, int8)
        return
    assert fb.choose_runtime(backend, dev, spec, int8).name == (fb.DEFAULT_CPU_BACKEND if want == "DEFAULT" else want)


def test_the_default_cpu_choice_falls_back_when_not_installed(weights: Path, monkeypatch: pytest.MonkeyPatch):
    assert fb.DEFAULT_CPU_BACKEND == "onnxruntime"  # measured: README, section "Backends"
    monkeypatch.setattr(fb, "installed", lambda backend: backend == "onnxruntime")
    assert fb.choose_runtime("auto", CPU, str(weights)).name == "onnxruntime"
    monkeypatch.setattr(fb, "installed", lambda backend: False)
    assert fb.choose_runtime("auto", CPU, str(weights)).name == "torch"
    assert fb.choose_runtime("auto", CPU, str(weights), True).name == "onnxruntime"  # int8 needs it: fails when loading
    assert fb.choose_runtime("onnxruntime", CPU, str(weights)).name == "onnxruntime"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"half": True}, "--half needs a CUDA device (fp16 is not faster on CPU); drop --half or use --device 0"),
    ({"half": True, "backend": "onnxruntime", "device": GPU},
     "--half runs torch (or an fp16 .onnx export) on CUDA; use --backend torch, not onnxruntime"),
    ({"half": True, "int8": "calib", "device": GPU},
     "--half runs torch (or an fp16 .onnx export) on CUDA; use --backend torch, not onnxruntime"),
    ({"shapes": "static"}, "shapes='static': choose one of dynamic, fixed"),
])
def test_the_loading_errors_are_as_before(kwargs: dict, message: str, weights: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("kapao.runtime.cpu_flags", frozenset)  # a CPU without bf16: --half there is fp16, refused
    kwargs = {"device": "cpu", **kwargs}
    if kwargs.get("int8") == "calib":
        kwargs["int8"] = Int8Calibration((), 128)
    shapes = kwargs.pop("shapes", fb.DEFAULT_SHAPES)
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        fb.load_backend(str(weights), fb.RuntimeSpec(**kwargs), shapes=shapes)


def test_an_exported_file_is_not_quantised_again():
    with pytest.raises(ConfigError, match=r"^--int8: m\.onnx is already exported; quantise the \.pt weights"):
        fb.load_backend("m.onnx", fb.RuntimeSpec("cpu", int8=Int8Calibration((), 128)))


def _with_fixed_scores(backend, layout: HeadLayout):
    """`backend` with scores replaced by fixed, well-separated values at spread-out anchors (6 poses, and
    keypoint objects of every type): a random model scores every anchor alike, so which poses survive
    NMS would be decided by rounding; this way the decisions are fixed and the coordinates -- the
    network's own, through NMS and fusion -- are what is compared."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        y = backend(x).clone()
        y[..., layout.obj:layout.cls.stop] = 0.0
        n = y.shape[1]
        for i in range(6):
            a = (2 * i + 1) * n // 13
            y[:, a, layout.obj], y[:, a, layout.cls.start] = 1.0, 0.9 - 0.1 * i
            for k in range(layout.num_keypoints):
                y[:, a + 1 + k, layout.obj], y[:, a + 1 + k, layout.cls.start + 1 + k] = 1.0, 0.8
        return y

    return forward


@pytest.mark.slow
def test_every_backend_gives_the_same_poses(weights: Path, coco_mini: Path):
    image = load_image(sorted((coco_mini / "images").glob("*.jpg"))[0])
    torch_backend = fb.load_backend(weights, fb.RuntimeSpec("cpu", backend="torch"))
    layout = HeadLayout(5)
    settings = PREDICT_SETTINGS.replace(conf=0.3, conf_kp=0.3)

    def poses(backend) -> Poses:
        predictor = Predictor(_with_fixed_scores(backend, layout), backend.schema, CPU, settings)
        return predictor.predict_images([image], 192)[0]

    ref = poses(torch_backend)
    assert len(ref) == 6
    x = torch.rand(2, 3, 128, 192)
    with torch.no_grad():
        ref_raw = torch_backend(x)
    worst = 0.0
    for name, shapes in [("torch-cl", "dynamic"), ("onnxruntime", "dynamic"), ("onnxruntime", "fixed"),
                         ("openvino", "dynamic"), ("openvino", "fixed")]:
        if name == "openvino":
            pytest.importorskip("openvino")
        backend = fb.load_backend(weights, fb.RuntimeSpec("cpu", backend=name), shapes=shapes)
        got = poses(backend)
        assert len(got) == len(ref) and torch.equal(got.keypoints[..., 2] > 0, ref.keypoints[..., 2] > 0)
        diff = max(float((got.boxes - ref.boxes).abs().max()), float((got.keypoints - ref.keypoints).abs().max()))
        with torch.no_grad():
            raw = (backend(x) - ref_raw).abs()
        coords = float(torch.cat((raw[..., layout.box], raw[..., layout.kpt]), -1).max())
        worst = max(worst, diff, coords)
        assert diff < COORD_TOL and coords < COORD_TOL, (name, shapes, diff, coords)
        assert float(raw[..., layout.obj:layout.cls.stop].max()) < SCORE_TOL, (name, shapes)
    print(f"largest coordinate difference to torch: {worst:.2e} px")


def test_auto_on_cpu_runs_the_cached_export(weights: Path):
    api = KAPAO(weights, "cpu")
    if fb.DEFAULT_CPU_BACKEND.startswith("torch"):
        assert isinstance(api.backend, TorchBackend)
        return
    made = api.backend if fb.DEFAULT_SHAPES == "dynamic" else fb.load_backend(weights, fb.RuntimeSpec("cpu"),
                                                                               shapes="dynamic")
    assert isinstance(made, OnnxBackend if fb.DEFAULT_CPU_BACKEND == "onnxruntime" else fb.OpenVinoBackend)
    assert made.info.runtime == fb.DEFAULT_CPU_BACKEND and made.info.path == str(weights)
    assert Path(made.info.exported).parent == cache_dir()
    assert made.info == BackendInfo(fb.DEFAULT_CPU_BACKEND, "fp32", CPU, path=str(weights), format="kapao",
                                    exported=made.info.exported, details=made.info.details)
    assert made.info.dynamic and not made.info.int8 and made.info.details["epoch"] == 0
    assert api.default_imgsz == 1280 and api.schema.num_keypoints == 5
    assert isinstance(KAPAO(kapao_n(5), "cpu").backend, TorchBackend)


def test_shape_cache_keeps_the_most_recent_shapes():
    made = []

    def make(shape: tuple[int, int]) -> object:
        made.append(shape)
        return lambda x: torch.full((x.shape[0], 1, 1), float(shape[0] * 1000 + shape[1]))

    cache = fb.ShapeCacheBackend(make, None, BackendInfo("x"), CPU, max_shapes=2)
    assert cache.fixed_shape is None and not cache.half
    for h, w in [(128, 192), (128, 192), (192, 128), (128, 192), (256, 256), (192, 128)]:
        assert float(cache(torch.zeros(1, 3, h, w))) == h * 1000 + w
    assert made == [(128, 192), (192, 128), (256, 256), (192, 128)]  # (192, 128) was evicted, then made again
    assert list(cache.backends) == [(256, 256), (192, 128)]


def test_cli_backend_and_int8_options(weights: Path, coco_mini: Path, tmp_path: Path):
    image = str(sorted((coco_mini / "images").glob("*.jpg"))[0])
    args = ["predict", image, "--weights", str(weights), "--imgsz", "128", "--device", "cpu", "--project", str(tmp_path)]
    res = CliRunner().invoke(cli, [*args, "--int8"])
    assert res.exit_code == 2 and "--int8 needs calibration images" in res.output
    res = CliRunner().invoke(cli, [*args, "--calib", str(coco_mini / "images")])
    assert res.exit_code == 2 and "--calib is for --int8" in res.output
    res = CliRunner().invoke(cli, [*args, "--calib", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "neither a folder of images nor a dataset" in res.output
    res = CliRunner().invoke(cli, [*args, "--backend", "torch", "--int8", "--calib", str(coco_mini / "images")])
    assert res.exit_code == 1 and "--int8 runs on onnxruntime" in res.output
    res = CliRunner().invoke(cli, [*args, "--backend", "onnxruntime", "--nosave"])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "kapao-cache").glob("tiny-*.onnx"))) == 1


def test_half_on_a_bf16_cpu_runs_torch_bf16_with_fp32_decoding(weights: Path, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture):
    """--half where the CPU flags name AVX512_BF16: torch autocast bf16, channels_last, a notice; outputs
    fp32 and within bf16 rounding of fp32; the cached runtimes, exported files and int8 are refused."""
    import logging

    monkeypatch.setattr("kapao.runtime.cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    with caplog.at_level(logging.INFO, logger="kapao"):
        bf16 = fb.load_backend(str(weights), fb.RuntimeSpec("cpu", half=True))
    assert isinstance(bf16, TorchBackend) and bf16.bf16 and bf16.channels_last and not bf16.half
    assert bf16.info.precision == "bf16" and bf16.info.runtime == "torch-cl"
    assert any("bfloat16" in r.getMessage() for r in caplog.records)
    fp32 = fb.load_backend(str(weights), fb.RuntimeSpec("cpu", backend="torch"))
    x = torch.rand(1, 3, 128, 192)
    with torch.inference_mode():
        a, b = fp32(x), bf16(x)
    layout = HeadLayout(a.shape[-1] // 3 - 2)
    assert b.dtype == torch.float32 and b.shape == a.shape
    d = (a - b).abs()
    assert 0 < float(d.max())  # it did run in bf16
    assert float(d[..., layout.kpt].max()) < 16 and float(d[..., layout.obj].max()) < 0.05
    with pytest.raises(ConfigError, match=r"^--half on the CPU runs torch in bf16; use --backend auto or torch"):
        fb.load_backend(str(weights), fb.RuntimeSpec("cpu", half=True, backend="onnxruntime"))
    with pytest.raises(ConfigError, match="^--int8 and --half exclude each other"):
        fb.load_backend(str(weights), fb.RuntimeSpec("cpu", half=True, int8=Int8Calibration((), 128)))
    with pytest.raises(ConfigError, match="needs .pt weights; m.onnx is an exported model"):
        fb.load_backend("m.onnx", fb.RuntimeSpec("cpu", half=True))


def test_cli_half_on_the_cpu_follows_the_cpu_flags(weights: Path, coco_mini: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    """`predict --half --device cpu`: bf16 with a notice where the flags say bf16, a usage error saying why
    where they do not; `export --half` stays CUDA only."""
    image = str(sorted((coco_mini / "images").glob("*.jpg"))[0])
    args = ["predict", image, "--weights", str(weights), "--imgsz", "128", "--device", "cpu", "--project",
            str(tmp_path), "--half", "--nosave"]
    monkeypatch.setattr("kapao.runtime.cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0 and "1 frames" in res.output, res.output
    assert any("running the network in bfloat16 on the CPU" in r.getMessage() for r in caplog.records)
    res = CliRunner().invoke(cli, ["export", "--weights", str(weights), "--half", "--device", "cpu"])
    assert res.exit_code == 2 and "needs a CUDA device (fp16 is for GPUs)" in res.output and "bf16" not in res.output
    monkeypatch.setattr("kapao.runtime.cpu_flags", lambda: frozenset({"avx512f"}))
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2 and "or a CPU with native bf16 (AVX512_BF16 or AMX; this CPU has neither)" in res.output


def test_the_cached_model_keeps_onnxruntimes_optimised_graph(weights: Path):
    """The first session of a cached export writes the optimised graph beside it; later sessions load it
    (same outputs); a damaged copy is optimised again, not an error."""
    first = fb.load_backend(str(weights), fb.RuntimeSpec("cpu", backend="onnxruntime"))
    optimised = list((cache_dir() / "ort-optimized").glob("*.onnx"))
    assert len(optimised) == 1 and not list((cache_dir() / "ort-optimized").glob(".*.tmp"))
    x = torch.rand(1, 3, 128, 192)
    again = fb.load_backend(str(weights), fb.RuntimeSpec("cpu", backend="onnxruntime"))
    assert torch.equal(first(x), again(x)) and again.info.precision == "fp32"
    optimised[0].write_bytes(b"damaged")
    repaired = fb.load_backend(str(weights), fb.RuntimeSpec("cpu", backend="onnxruntime"))
    assert torch.equal(first(x), repaired(x))
