"""Choosing the runtime: --backend auto/torch/torch-cl/onnxruntime/openvino give the same poses."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import kapao.backends.dispatch as fb
from kapao.backends.cache import cache_dir
from kapao.backends.runtimes import OnnxBackend, TorchBackend
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


def test_auto_picks_the_table_choice(weights: Path, monkeypatch: pytest.MonkeyPatch):
    model = kapao_n(5)
    assert fb.choose_backend("auto", CPU, str(weights)) == fb.DEFAULT_CPU_BACKEND
    assert fb.choose_backend("auto", GPU, str(weights)) == "torch"  # a GPU keeps torch
    assert fb.choose_backend("auto", CPU, model) == "torch"  # an in-memory model may still change
    assert fb.choose_backend("auto", CPU, "m.onnx") == "onnxruntime"
    assert fb.choose_backend("auto", CPU, str(weights), int8=True) == fb.INT8_BACKEND
    for name in fb.BACKENDS[1:]:
        assert fb.choose_backend(name, CPU, str(weights)) == name
    with pytest.raises(ConfigError, match="--backend openvino runs on the CPU"):
        fb.choose_backend("openvino", GPU, str(weights))
    with pytest.raises(ConfigError, match="--int8 runs on onnxruntime"):
        fb.choose_backend("torch", CPU, str(weights), int8=True)
    with pytest.raises(ConfigError, match="needs .pt weights"):
        fb.choose_backend("torch-cl", CPU, "m.onnx")
    with pytest.raises(ConfigError, match="choose one of auto, torch"):
        fb.choose_backend("tensorrt", CPU, str(weights))
    with pytest.raises(ConfigError, match="--half needs a CUDA device"):
        fb.select_backend(str(weights), "cpu", half=True)
    monkeypatch.setattr(fb, "installed", lambda backend: False)  # `pip install kapao` without the [onnx] extra
    assert fb.choose_backend("auto", CPU, str(weights)) == "torch"


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
    torch_backend = fb.select_backend(weights, "cpu", backend="torch")
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
        backend = fb.select_backend(weights, "cpu", backend=name, shapes=shapes)
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
    made = api.backend if fb.DEFAULT_SHAPES == "dynamic" else fb.select_backend(weights, "cpu", shapes="dynamic")
    assert isinstance(made, OnnxBackend if fb.DEFAULT_CPU_BACKEND == "onnxruntime" else fb.OpenVinoBackend)
    assert made.info["backend"] == fb.DEFAULT_CPU_BACKEND and made.info["path"] == str(weights)
    assert Path(made.info["exported"]).parent == cache_dir()
    assert api.default_imgsz == 1280 and api.schema.num_keypoints == 5
    assert isinstance(KAPAO(kapao_n(5), "cpu").backend, TorchBackend)


def test_shape_cache_keeps_the_most_recent_shapes():
    made = []

    def make(shape: tuple[int, int]) -> object:
        made.append(shape)
        return lambda x: torch.full((x.shape[0], 1, 1), float(shape[0] * 1000 + shape[1]))

    cache = fb.ShapeCacheBackend(make, None, {"backend": "x"}, CPU, max_shapes=2)
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
