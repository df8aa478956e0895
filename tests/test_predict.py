"""The predict verb and Python API: sources, outputs, JSON, CLI; one inference path with val."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kapao.cli import cli
from kapao.config import PREDICT_SETTINGS
from kapao.model import kapao_n
from kapao.postprocess import Poses
from kapao.predict import KAPAO, Predictor, prepare_batch
from kapao.weights import save_checkpoint


def eager_model(num_keypoints: int = 17, seed: int = 0) -> torch.nn.Module:
    """An untrained size-n model whose head is biased to fire everywhere, so every image gets poses."""
    torch.manual_seed(seed)
    model = kapao_n(num_keypoints)
    head = model.head
    with torch.no_grad():
        for conv in head.m:
            b = conv.bias.view(head.na, head.no)
            b[:, model.layout.obj] = 8.0
            b[:, model.layout.cls.start] = 8.0  # person class
    return model.eval()


@pytest.fixture(scope="module")
def eager_weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("w") / "eager.pt"
    save_checkpoint(path, eager_model(), extra={"epoch": 0})
    return path


def test_prepare_batch_rect_and_shared_shape():
    a = np.zeros((720, 1280, 3), np.uint8)
    b = np.zeros((300, 200, 3), np.uint8)
    x, metas = prepare_batch([a], 640)
    assert tuple(x.shape) == (1, 3, 384, 640)  # 360 rows -> next multiple of 64
    x, metas = prepare_batch([a, b], 640)
    assert tuple(x.shape) == (2, 3, 640, 640) and x.dtype == torch.uint8
    assert metas[1]["orig_shape"] == (300, 200)
    rw, rh = metas[1]["ratio"]
    assert rw == pytest.approx(427 / 200) and rh == pytest.approx(640 / 300)


def test_predict_arrays_match_batch_and_channel_order():
    """BGR arrays in, poses in original pixels out; batching does not change results."""
    api = KAPAO(eager_model(), device="cpu")
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (200, 300, 3), dtype=np.uint8) for _ in range(2)]
    settings = PREDICT_SETTINGS.replace(conf=0.5)
    one = [api.predict(im, imgsz=256, settings=settings)[0] for im in imgs]
    both = api.predict(imgs, imgsz=256, settings=settings)
    for a, b in zip(one, both):
        assert isinstance(a, Poses) and len(a) > 0 and a.keypoints.shape[1:] == (17, 3)
        assert (a.boxes[:, [0, 2]] <= 300).all() and (a.boxes[:, [1, 3]] <= 200).all()
        assert len(a) == len(b) and torch.allclose(a.boxes, b.boxes, atol=1e-3)


def test_predictor_uses_fused_copy_and_matches_unfused():
    model = eager_model()
    x, metas = prepare_batch([np.full((128, 128, 3), 100, np.uint8)], 128)
    fused = Predictor.from_model(model, torch.device("cpu"))
    plain = Predictor.from_model(model, torch.device("cpu"), fuse=False)
    a, b = fused(x, metas)[0], plain(x, metas)[0]
    assert any(hasattr(m, "bn") for m in model.modules())  # the caller's model was not fused in place
    assert len(a) == len(b) and torch.allclose(a.keypoints, b.keypoints, atol=1e-2)


def test_predict_video_cli(eager_weights: Path, test_video: Path, tmp_path: Path):
    res = CliRunner().invoke(cli, ["predict", str(test_video), "--weights", str(eager_weights), "--imgsz", "256",
                                   "--device", "cpu", "--conf", "0.5", "--boxes", "--project", str(tmp_path)])
    assert res.exit_code == 0, res.output
    out = tmp_path / "exp"
    assert f"Results saved to {out}" in res.output and "5 frames" in res.output
    cap = cv2.VideoCapture(str(out / "posetrack-000001.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 5
    assert (cap.get(cv2.CAP_PROP_FRAME_WIDTH), cap.get(cv2.CAP_PROP_FRAME_HEIGHT)) == (1280, 720)
    assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(30.0)
    records = json.loads((out / "predictions.json").read_text())
    assert {r["image_id"] for r in records} == {0, 1, 2, 3, 4}
    r = records[0]
    assert r["category_id"] == 1 and len(r["keypoints"]) == 17 * 3 and len(r["bbox"]) == 4 and 0.5 < r["score"] <= 1


def test_predict_folder_glob_and_increment(eager_weights: Path, coco_mini: Path, tmp_path: Path):
    runner = CliRunner()
    args = ["--weights", str(eager_weights), "--imgsz", "192", "--device", "cpu", "--project", str(tmp_path)]
    res = runner.invoke(cli, ["predict", str(coco_mini / "images"), *args, "--batch", "2"])
    assert res.exit_code == 0, res.output
    files = sorted(p.name for p in (tmp_path / "exp").iterdir())
    assert files == sorted([p.name for p in (coco_mini / "images").glob("*.jpg")] + ["predictions.json"])
    res = runner.invoke(cli, ["predict", str(coco_mini / "images" / "*0785.jpg"), *args, "--nosave"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "exp2").iterdir()) == ["predictions.json"]
    ids = {r["image_id"] for r in json.loads((tmp_path / "exp2" / "predictions.json").read_text())}
    assert ids == {785}


def test_predict_tta_runs_and_maps_back(eager_weights: Path):
    api = KAPAO(eager_weights, device="cpu")
    img = np.random.default_rng(1).integers(0, 255, (256, 320, 3), dtype=np.uint8)
    out = api.predict(img, imgsz=256, settings=PREDICT_SETTINGS.replace(conf=0.5), scales=[0.8, 1, 1.2],
                      flips=[False, True, False])[0]
    assert len(out) > 0 and (out.boxes[:, 2] <= 320).all() and (out.boxes[:, 3] <= 256).all()


@pytest.mark.parametrize("argv, match, code", [
    (["predict", "/nonexistent/file.jpg"], "does not exist", 1),
    (["predict", "x.jpg", "--imgsz", "100"], "multiple of 64", 2),
    (["predict", "x.jpg", "--conf", "1.5"], "0.0<=x<=1.0", 2),
    (["predict", "x.jpg", "--scales", "1,0.8", "--flips", "none"], "one flip per scale", 2),
    (["predict", "x.jpg", "--flips", "up"], "none or lr", 2),
])
def test_predict_cli_errors(argv, match, code):
    res = CliRunner().invoke(cli, argv + ["--weights", "none.pt", "--device", "cpu"])
    assert res.exit_code == code, res.output
    assert match in res.output and "Traceback" not in res.output


def test_predict_empty_folder_and_unwritable_output(eager_weights: Path, tmp_path: Path, coco_mini: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(cli, ["predict", str(empty), "--weights", str(eager_weights), "--device", "cpu"])
    assert res.exit_code == 1 and "is empty" in res.output
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = CliRunner().invoke(cli, ["predict", str(coco_mini / "images"), "--weights", str(eager_weights),
                                   "--device", "cpu", "--imgsz", "128", "--project", str(blocker / "sub")])
    assert res.exit_code == 1 and "--project" in res.output, res.output
