"""kapao export --format torchscript|openvino: each file checked against torch on a real image and run by
`kapao predict --weights FILE` through the dispatcher's row for its format."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from kapao.backends.dispatch import RuntimeSpec, describe_backend, load_backend
from kapao.backends.exported import TorchScriptBackend
from kapao.cfg.schema import HeadLayout
from kapao.cli.main import cli
from kapao.errors import WeightsError
from kapao.export import check_image_tensor, compare_outputs, export_openvino, export_torchscript
from kapao.models.network import kapao_n
from kapao.weights.checkpoint import save_checkpoint

COORD_TOL, SCORE_TOL = 1e-2, 1e-4  # as tests/test_export.py: fp32 rounding of another runtime


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "tiny.pt"
    save_checkpoint(path, kapao_n(17).eval(), extra={"epoch": 0})
    return path


def _torch_output(weights: Path, x: torch.Tensor) -> torch.Tensor:
    return load_backend(str(weights), RuntimeSpec("cpu", backend="torch"))(x).float()


def test_torchscript_export_matches_torch_and_runs(weights: Path, coco_mini: Path, tmp_path: Path):
    image = sorted((coco_mini / "images").glob("*.jpg"))[0]
    out = export_torchscript(weights, tmp_path / "m.torchscript", (128, 192), check_image=image)
    backend = load_backend(str(out), RuntimeSpec("cpu"))  # auto: the torchscript row
    assert isinstance(backend, TorchScriptBackend) and describe_backend(backend)["backend"] == "torchscript"
    assert backend.fixed_shape == (128, 192) and backend.schema.num_keypoints == 17
    check = json.loads(backend.info.details["check"])
    assert check["runtime"] == "torchscript" and check["coords"] < COORD_TOL and check["scores"] < SCORE_TOL
    x = check_image_tensor(image, (128, 192))
    diff = compare_outputs(_torch_output(weights, x), backend(x), HeadLayout(17))
    assert diff["coords"] < COORD_TOL and diff["scores"] < SCORE_TOL
    res = CliRunner().invoke(cli, ["predict", str(image), "--weights", str(out), "--imgsz", "128",
                                   "--project", str(tmp_path / "runs")])
    assert res.exit_code == 0, res.output
    assert "torchscript fp32 on cpu" in res.output
    bad = tmp_path / "bad.torchscript"
    bad.write_bytes(b"not a zip")
    with pytest.raises(WeightsError, match="is not a readable TorchScript model"):
        TorchScriptBackend(bad)


def test_openvino_ir_export_matches_torch_and_runs(weights: Path, coco_mini: Path, tmp_path: Path):
    pytest.importorskip("openvino")
    from kapao.backends.dispatch import OpenVinoBackend

    image = sorted((coco_mini / "images").glob("*.jpg"))[1]
    out = export_openvino(weights, tmp_path / "m.xml", 128, dynamic=True, check_image=image)
    assert out.is_file() and out.with_suffix(".bin").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "m.xml"]  # no staging folder left
    backend = load_backend(str(out), RuntimeSpec("cpu"))
    assert isinstance(backend, OpenVinoBackend) and backend.fixed_shape is None
    check = json.loads(backend.info.details["check"])
    assert check["runtime"] == "openvino" and check["coords"] < COORD_TOL and check["scores"] < SCORE_TOL
    res = CliRunner().invoke(cli, ["predict", str(image), "--weights", str(out), "--imgsz", "192",
                                   "--project", str(tmp_path / "runs")])
    assert res.exit_code == 0, res.output
    assert "openvino fp32 on cpu" in res.output


def test_export_cli_formats(weights: Path, tmp_path: Path):
    res = CliRunner().invoke(cli, ["export", "--weights", str(weights), "--format", "torchscript", "--imgsz", "128",
                                   "-o", str(tmp_path / "t.torchscript")])
    assert res.exit_code == 0, res.output
    assert "Exported" in res.output and "torchscript vs torch on bus.jpg 128x128: max abs diff" in res.output
    assert f"kapao predict SOURCE --weights {tmp_path / 't.torchscript'}" in res.output
    for extra, message in [(["--format", "torchscript", "--dynamic"], "--dynamic is not available with --format torchscript"),
                           (["--format", "openvino", "--int8"], "--int8 is not available with --format openvino")]:
        res = CliRunner().invoke(cli, ["export", "--weights", str(weights), *extra, "-o", str(tmp_path / "x")])
        assert res.exit_code == 2 and message in res.output
