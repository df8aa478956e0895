"""Static int8 quantisation: calibration images, the quantised graph, export --int8."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kapao.backends.cache import build_onnx
from kapao.backends.int8 import INT8_METADATA, Int8Calibration, calibration_images, quantize_int8, recipe_digest
from kapao.backends.onnx_graph import head_scope
from kapao.backends.runtimes import OnnxBackend, read_metadata
from kapao.backends.runtimes import parse_metadata as read_metadata_dict
from kapao.cfg.schema import HeadLayout
from kapao.cli.main import cli
from kapao.errors import ConfigError, DataError
from kapao.models.network import kapao_n
from kapao.weights.checkpoint import save_checkpoint

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime.quantization")


def _images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    import cv2

    for i in range(n):
        cv2.imwrite(str(folder / f"{i:03d}.jpg"), np.full((40, 60, 3), 10 * i, np.uint8))
    return sorted(folder.glob("*.jpg"))


def test_calibration_images_folder_dataset_and_errors(tmp_path: Path, coco_mini_yaml: Path, coco_mini: Path):
    files = _images(tmp_path / "imgs", 10)
    (tmp_path / "imgs" / "notes.txt").write_text("x")
    assert calibration_images(tmp_path / "imgs", 4) == [files[0], files[2], files[5], files[7]]  # spread out
    assert calibration_images(tmp_path / "imgs", 50) == files
    assert calibration_images(str(coco_mini_yaml), 2) == calibration_images(coco_mini / "images", 2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no calibration images in"):
        calibration_images(tmp_path / "empty")
    with pytest.raises(ConfigError, match="--calib-images 0"):
        calibration_images(tmp_path / "imgs", 0)
    a, b = Int8Calibration.from_spec(tmp_path / "imgs", 128, 3), Int8Calibration.from_spec(tmp_path / "imgs", 192, 3)
    assert a.digest != b.digest and a.digest == Int8Calibration.from_spec(tmp_path / "imgs", 128, 3).digest


@pytest.mark.slow
def test_int8_graph_keeps_the_head_fp32_and_stays_close(coco_mini: Path):
    torch.manual_seed(0)
    model = kapao_n(5).eval()
    fp32 = build_onnx(model, "tiny", (128, 128), None, "k")
    calib = Int8Calibration.from_spec(coco_mini / "images", 128, 4)
    int8 = onnx.load_from_string(quantize_int8(fp32, calib, head_scope(model), (128, 128)))
    nodes = int8.graph.node
    convs = [n for n in nodes if n.op_type == "Conv"]
    head = [n for n in convs if n.name.startswith(head_scope(model))]
    assert len(head) == 4 and sum(n.op_type == "QuantizeLinear" for n in nodes) > 50
    int8_weights = [n for n in convs if n.input[1].endswith("DequantizeLinear_Output")]
    assert len(int8_weights) == len(convs) - 4 and not {n.name for n in head} & {n.name for n in int8_weights}
    meta = {p.key: p.value for p in int8.metadata_props}
    assert json.loads(meta[INT8_METADATA]) == {"images": 4, "imgsz": 128, "digest": calib.digest,
                                               "recipe": recipe_digest()}
    # activations unsigned (x86 VNNI multiplies u8 x s8), weights signed
    zero_points = {i.name: i.data_type for i in int8.graph.initializer if i.name.endswith("_zero_point")}
    acts = [zero_points[n.input[2]] for n in nodes if n.op_type == "QuantizeLinear" and n.input[2] in zero_points]
    assert acts and set(acts) == {onnx.TensorProto.UINT8}
    assert meta["cache_key"] == "k" and read_metadata_dict(meta).schema == model.schema
    x = torch.rand(1, 3, 128, 128)
    a, b = OnnxBackend(fp32)(x), OnnxBackend(int8.SerializeToString())(x)
    layout = HeadLayout(5)
    d = (a - b).abs()
    assert float(d[..., layout.kpt].max()) < 8.0  # pixels at 128: int8 noise, not a broken graph
    assert 0 < float(d.max())


@pytest.mark.slow
def test_export_int8_cli(tmp_path: Path, coco_mini: Path):
    weights = tmp_path / "tiny.pt"
    torch.manual_seed(0)
    save_checkpoint(weights, kapao_n(5).eval(), extra={"epoch": 0})
    args = ["export", "--weights", str(weights), "--imgsz", "128", "--no-check"]
    res = CliRunner().invoke(cli, [*args, "--int8"])
    assert res.exit_code == 2 and "--int8 needs calibration images" in res.output
    res = CliRunner().invoke(cli, [*args, "--int8", "--half", "--calib", str(coco_mini / "images")])
    assert res.exit_code == 2 and "--int8 and --half exclude each other" in res.output
    res = CliRunner().invoke(cli, [*args, "--int8", "--calib", str(coco_mini / "images"), "--calib-images", "2"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "tiny-int8.onnx"
    assert f"Exported {out}" in res.output and "int8" in res.output
    info = read_metadata(out)
    assert json.loads(info.raw[INT8_METADATA])["images"] == 2 and info.imgsz == (128, 128)
