"""ONNX export and the onnxruntime backend: round trips against torch, metadata, predict, errors, benchmark.

Tolerances (CPU, fp32, onnxruntime vs torch eager on the same fused model): decoded box/keypoint
coordinates within 1e-2 network-input pixels, scores (objectness, class probabilities) within 1e-4
(the measured differences: docs/DESIGN.md).
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from kapao.backends.runtimes import OnnxBackend, read_metadata
from kapao.cfg.schema import HeadLayout, KeypointSchema
from kapao.cfg.settings import PREDICT_SETTINGS, InferenceSettings
from kapao.data.sources import VideoReader, default_source, load_image
from kapao.errors import ConfigError, WeightsError
from kapao.export import check_image_tensor, compare_outputs, export_onnx
from kapao.infer.predictor import Predictor, prepare_batch
from kapao.models.network import default_schema, kapao_n
from kapao.poses import Poses
from kapao.weights.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parents[1]
COORD_TOL, SCORE_TOL = 1e-2, 1e-4
CPU = torch.device("cpu")


def untrained_model(schema: KeypointSchema | int = 17, seed: int = 0) -> torch.nn.Module:
    """A random size-n model whose outputs vary with the image; keypoint objects come from anchor 2 of
    strides 8 and 16, persons from all other anchors.

    With the default (small) init the features of a random P6 network hardly vary, so all scores sit
    in one narrow band and NMS order is decided by ties. Kaiming init keeps the signal, and one
    train-mode pass over bus.jpg and zidane.jpg sets BatchNorm statistics from real activations
    (variances floored by +0.05: near-dead channels would otherwise blow up fp32 rounding).
    """
    from kapao.infer.predictor import prepare_batch

    torch.manual_seed(seed)
    model = kapao_n(schema)
    head, cls = model.head, model.layout.cls
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d) and all(m is not c for c in head.m):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one pass sets the statistics
    x, _ = prepare_batch([load_image(str(default_source() / n)) for n in ("bus.jpg", "zidane.jpg")], 256)
    with torch.no_grad():
        model.train()(x.float() / 255)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var += 0.05
        for level, conv in enumerate(head.m):  # one objectness prior on every level; boxes, keypoints near anchors
            w, b = conv.weight.view(head.na, head.no, -1), conv.bias.view(head.na, head.no)
            for part in (model.layout.box, model.layout.kpt):
                w[:, part] *= 0.1
                b[:, part] = 0.0
            b[:, model.layout.obj] = 0.0
            if level < 2:  # keypoint objects (small) on strides 8, 16 (anchor 2); persons everywhere else
                b[:2, cls.start] += 2.0
                b[2, cls.start + 1:cls.stop] += 2.0
            else:
                b[:, cls.start] += 2.0
    return model.eval()


def torch_decoded(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The reference: the same forward the Predictor uses (fused copy, eval, decoded output)."""
    with torch.no_grad():
        return Predictor.from_model(model, CPU).forward(x)


def quantile_settings(model: torch.nn.Module, x: torch.Tensor) -> InferenceSettings:
    """Thresholds that pass the top ~0.5 % person and ~0.2 % keypoint-object candidates of ``x``.

    An untrained model's scores sit in a narrow band (its features hardly vary), so fixed thresholds
    pass none or all of them (then ties make NMS order arbitrary); quantiles give a few dozen distinct
    candidates. Every pose takes part in fusion, with a tolerance wide enough to fuse some keypoints.
    """
    layout = model.layout
    pred = torch_decoded(model, x)
    score, cls = (pred[..., layout.cls] * pred[..., layout.obj, None]).max(-1)
    conf = float(torch.quantile(score[cls == 0], 0.995))
    conf_kp = float(torch.quantile(score[cls > 0], 0.998))
    return PREDICT_SETTINGS.replace(conf=conf, conf_kp=conf_kp, conf_kp_person=0.0, tolerance=1000.0)


def assert_close_decoded(ref: torch.Tensor, got: torch.Tensor, layout: HeadLayout) -> None:
    diff = compare_outputs(ref, got, layout)
    assert diff["coords"] < COORD_TOL and diff["scores"] < SCORE_TOL, diff


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return untrained_model()


@pytest.fixture(scope="module")
def dynamic_onnx(model: torch.nn.Module, tmp_path_factory) -> Path:
    return export_onnx(model, tmp_path_factory.mktemp("onnx") / "dyn.onnx", imgsz=256, dynamic=True)


@pytest.mark.parametrize("imgsz", [128, 256])
def test_static_export_matches_torch(model: torch.nn.Module, imgsz: int, tmp_path: Path):
    path = export_onnx(model, tmp_path / "m.onnx", imgsz=imgsz)
    info = read_metadata(path)
    assert info.imgsz == (imgsz, imgsz) and not info.dynamic and info.batch == 1 and info.size == "n"
    check = info.check  # the export's own comparison on bus.jpg
    assert check["image"] == "bus.jpg" and check["coords"] < COORD_TOL and check["scores"] < SCORE_TOL
    backend = OnnxBackend(path)
    assert backend.fixed_shape == (imgsz, imgsz) and not backend.dynamic and not backend.fp16
    x = check_image_tensor(default_source() / "zidane.jpg", (imgsz, imgsz))
    ref, got = torch_decoded(model, x), backend(x)
    n = 3 * sum((imgsz // s) ** 2 for s in model.strides)
    assert got.shape == ref.shape == (1, n, model.layout.num_outputs) and got.dtype == torch.float32
    assert_close_decoded(ref, got, model.layout)


def test_dynamic_export_runs_other_shapes_and_batches(model: torch.nn.Module, dynamic_onnx: Path):
    backend = OnnxBackend(dynamic_onnx)
    assert backend.dynamic and backend.fixed_shape is None and backend.batch is None and backend.imgsz == (256, 256)
    rng = torch.Generator().manual_seed(0)
    for shape in [(1, 3, 128, 192), (2, 3, 256, 128)]:
        x = torch.rand(shape, generator=rng)
        ref, got = torch_decoded(model, x), backend(x)
        assert got.shape == ref.shape
        assert_close_decoded(ref, got, model.layout)


def test_fixed_shape_pads_smaller_inputs_and_splits_batches(model: torch.nn.Module, tmp_path: Path):
    backend = OnnxBackend(export_onnx(model, tmp_path / "s.onnx", imgsz=128, check=False))
    x = torch.rand(3, 3, 64, 128, generator=torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(x, [0, 0, 0, 64], value=114 / 255)
    got = backend(x)  # 3 images through a batch-1, 128x128 model: padded bottom, run one by one
    assert got.shape[0] == 3
    assert_close_decoded(torch_decoded(model, padded), got, model.layout)
    with pytest.raises(ConfigError, match="does not fit the ONNX model's fixed input 128x128"):
        backend(torch.rand(1, 3, 128, 192))


def test_metadata_round_trip_custom_schema(tmp_path: Path):
    schema = KeypointSchema(names=("head", "left_hand", "right_hand"), flip_index=(0, 2, 1),
                            sigmas=(0.05, 0.06, 0.07), skeleton=((0, 1), (0, 2)), kp_bbox=0.04)
    model = untrained_model(schema)
    path = export_onnx(model, tmp_path / "c.onnx", imgsz=(128, 192), check=False)
    info = read_metadata(path)
    assert info.schema == schema and info.imgsz == (128, 192) and info.raw["names"] == \
        '["person", "head", "left_hand", "right_hand"]'
    assert info.check is None and info.raw["format"] == "kapao-onnx" and int(info.raw["opset"]) == 17
    backend = OnnxBackend(path)
    assert backend.schema == schema and backend.fixed_shape == (128, 192)
    assert backend(torch.rand(1, 3, 128, 192)).shape[-1] == HeadLayout(3).num_outputs


def test_export_leaves_model_alone_and_writes_next_to_weights(tmp_path: Path):
    model = untrained_model()
    model.train()
    weights = save_checkpoint(tmp_path / "mine.pt", model)
    path = export_onnx(str(weights), imgsz=128, check=False)
    assert path == tmp_path / "mine.onnx" and path.is_file()
    assert model.training and any(hasattr(m, "bn") for m in model.modules())  # not fused, mode kept
    assert read_metadata(path).schema == default_schema(17)
    assert export_onnx(model, tmp_path, imgsz=128, check=False) == tmp_path / "kapao_n.onnx"  # a folder


def assert_same_poses(a: Poses, b: Poses) -> None:
    """Same poses in the same order; coordinates in original-image pixels (4-5x the input's)."""
    assert len(a) == len(b) > 0
    assert torch.allclose(a.scores, b.scores, atol=SCORE_TOL)
    assert torch.allclose(a.boxes, b.boxes, atol=0.05) and torch.allclose(a.keypoints, b.keypoints, atol=0.05)
    assert torch.equal(a.fused, b.fused)  # the per-keypoint confidences (above) come from the same decoded tensor


def test_predict_through_onnxruntime_gives_same_poses(model: torch.nn.Module, dynamic_onnx: Path):
    images = [load_image(str(default_source() / n)) for n in ("bus.jpg", "zidane.jpg")]
    x, metas = prepare_batch(images, 256)
    settings = quantile_settings(model, x.float() / 255)
    backend = OnnxBackend(dynamic_onnx)
    ort_pred = Predictor(backend, backend.schema, backend.device, settings)
    torch_pred = Predictor.from_model(model, CPU, settings=settings)
    fused = unfused_with_conf = 0
    for a, b in zip(ort_pred.predict_images(images, 256), torch_pred.predict_images(images, 256)):
        assert_same_poses(a, b)
        fused += int(a.fused.sum())
        unfused_with_conf += int((a.keypoints[..., 2][~a.fused] > 0).sum())
    assert fused > 0 and unfused_with_conf > 0  # fusion and the evidence of unfused keypoints took part


def test_onnx_predict_on_video_matches_torch(model: torch.nn.Module, dynamic_onnx: Path, test_video: Path):
    """Through Predictor directly (see the next test for the KAPAO API)."""
    frames = [f.image for f in VideoReader(str(test_video))]
    assert len(frames) == 5
    x, _ = prepare_batch(frames[:1], 256)
    settings = quantile_settings(model, x.float() / 255)
    backend = OnnxBackend(dynamic_onnx)
    ort_pred = Predictor(backend, backend.schema, backend.device, settings)
    torch_pred = Predictor.from_model(model, CPU, settings=settings)
    for img in frames[:2]:
        assert_same_poses(ort_pred.predict_images([img], 256)[0], torch_pred.predict_images([img], 256)[0])
    assert ort_pred.timing.images == 2


def test_dynamic_graph_has_no_scatter(dynamic_onnx: Path):
    """decode builds its output with one concatenation: no ScatterND nodes in the exported graph."""
    import onnx

    assert "ScatterND" not in {n.op_type for n in onnx.load(str(dynamic_onnx)).graph.node}


def test_export_cli_then_predict_cli(tmp_path: Path, test_video: Path):
    from click.testing import CliRunner

    from kapao.cli.main import cli
    from kapao.weights.checkpoint import save_checkpoint

    weights = tmp_path / "n.pt"
    save_checkpoint(weights, untrained_model(), extra={"epoch": 0})
    runner = CliRunner()
    res = runner.invoke(cli, ["export", "--weights", str(weights), "--imgsz", "256"])
    assert res.exit_code == 0, res.output
    onnx_path = tmp_path / "n.onnx"
    assert f"Exported {onnx_path}" in res.output and "max abs diff" in res.output
    res = runner.invoke(cli, ["predict", str(test_video), "--weights", str(onnx_path), "--device", "cpu",
                              "--project", str(tmp_path / "runs")])  # --imgsz defaults to the file's 256
    assert res.exit_code == 0, res.output
    assert "5 frames" in res.output and (tmp_path / "runs" / "exp" / "posetrack-000001.mp4").is_file()
    res = runner.invoke(cli, ["predict", str(test_video), "--weights", str(onnx_path), "--imgsz", "640"])
    assert res.exit_code == 1 and "fixed 256x256 input" in res.output


def test_kapao_api_runs_onnx_on_video(dynamic_onnx: Path, test_video: Path, tmp_path: Path):
    from kapao.infer.predictor import KAPAO

    run = KAPAO(str(dynamic_onnx), device="cpu").run(str(test_video), imgsz=256, project=tmp_path,
                                                      settings=PREDICT_SETTINGS.replace(conf=0.0001))
    assert run.frames == 5 and (run.save_dir / "posetrack-000001.mp4").is_file() and run.json_path.is_file()


def test_backend_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(WeightsError, match="ONNX model not found"):
        OnnxBackend(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf at all" * 10)
    with pytest.raises(WeightsError, match="is not a readable ONNX model") as e:
        OnnxBackend(bad)
    assert "\n" not in str(e.value)
    foreign = tmp_path / "foreign.onnx"
    torch.onnx.export(torch.nn.Conv2d(3, 4, 1), (torch.zeros(1, 3, 8, 8),), str(foreign), dynamo=False)
    with pytest.raises(WeightsError, match="has no kapao metadata"):
        OnnxBackend(foreign)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.raises(WeightsError, match=r"needs onnxruntime.*pip install kapao\[onnx\]"):
        OnnxBackend(foreign)


def test_export_errors(model: torch.nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(ConfigError, match="--half needs a CUDA device"):
        export_onnx(model, tmp_path / "h.onnx", imgsz=128, half=True, device="cpu")
    with pytest.raises(ConfigError, match="multiples of 64"):
        export_onnx(model, tmp_path / "x.onnx", imgsz=100)
    with pytest.raises(ConfigError, match="--opset 11"):
        export_onnx(model, tmp_path / "x.onnx", imgsz=128, opset=11)
    with pytest.raises(WeightsError, match="nothing.pt.* not found"):
        export_onnx(tmp_path / "nothing.pt")
    monkeypatch.setitem(sys.modules, "onnxslim", None)
    with pytest.raises(ConfigError, match="--simplify needs the 'onnxslim' package"):
        export_onnx(model, tmp_path / "x.onnx", imgsz=128, simplify=True, check=False)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_simplified_export_matches_torch(model: torch.nn.Module, tmp_path: Path):
    pytest.importorskip("onnxslim")
    info = read_metadata(export_onnx(model, tmp_path / "s.onnx", imgsz=128, simplify=True))
    assert info.check["coords"] < COORD_TOL and info.check["scores"] < SCORE_TOL


@pytest.mark.slow
def test_benchmark_quick_prints_table(tmp_path: Path):
    cmd = [sys.executable, str(REPO / "scripts" / "benchmark.py"), "--quick", "--project", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout.splitlines()
    start = next(i for i, ln in enumerate(out) if ln.startswith("| model |"))
    lines = [ln for ln in out[start:out.index("", start)]]
    assert len(lines) == 6 and "forward ms" in lines[0], res.stdout  # header, rule, torch, onnxruntime, 2 peers
    rows = {(ln.split("|")[1].strip(), ln.split("|")[2].strip()): ln.split("|") for ln in lines[2:]}
    assert set(rows) == {("kapao-n @256", "torch eager"), ("kapao-n @256", "onnxruntime dynamic"),
                         ("yolo11n-pose @256", "ultralytics"), ("yolo26n-pose @256", "ultralytics")}, res.stdout
    for key in (("kapao-n @256", "torch eager"), ("kapao-n @256", "onnxruntime dynamic")):
        # forward (video, crowded), post, frame ms, GFLOP/s, e2e fps
        values = [float(rows[key][i].split()[0]) for i in (3, 4, 5, 7, 8, 9)]
        assert np.isfinite(values).all() and min(values) > 0, rows[key]
    for key in (("yolo11n-pose @256", "ultralytics"), ("yolo26n-pose @256", "ultralytics")):
        values = [float(rows[key][i].split()[0]) for i in (3, 7, 8, 9)]  # forward, frame ms, GFLOP/s, e2e fps
        assert np.isfinite(values).all() and min(values) > 0, rows[key]
    assert re.search(r"2048\^3 fp32 matmul = [0-9]+ GFLOP/s", res.stdout), res.stdout
    hot = [ln for ln in out if ln.startswith("| conf 0.3 / conf-kp 0.3 |") or ln.startswith("| val thresholds")]
    assert len(hot) == 2 and all("| identical |" in ln or "reordered" in ln for ln in hot), res.stdout
    assert "network access attempts: 0" in res.stdout and "Targets" in res.stdout


def test_export_cli_unwritable_output_fails_before_exporting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from click.testing import CliRunner

    from kapao.cli.main import cli

    weights = save_checkpoint(tmp_path / "w.pt", kapao_n(17))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    import kapao.export as ke

    monkeypatch.setattr(ke, "_trace", lambda *a, **k: pytest.fail("exported although the output is unwritable"))
    res = CliRunner().invoke(cli, ["export", "--weights", str(weights), "--imgsz", "128", "-o", str(blocker / "x.onnx")])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.strip() == f"Error: cannot write {blocker / 'x.onnx'}: {blocker} is a file, not a folder; choose " \
                                 "a writable folder"
