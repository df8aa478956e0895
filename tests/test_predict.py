"""The predict verb and Python API: sources, outputs, JSON, CLI; one inference path with val."""
from __future__ import annotations

import json
import os
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
    plain = Predictor.from_model(model, torch.device("cpu"), fold_bn=False)
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


# Bad options and SOURCEs that name nothing are usage errors (exit 2): tests/test_cli.py::BAD_INVOCATIONS.
def _run(*argv: str):
    res = CliRunner().invoke(cli, ["predict", *argv])
    assert "Traceback" not in res.output
    return res, res.output.strip().splitlines()[-1]


def test_predict_unwritable_output(eager_weights: Path, tmp_path: Path, coco_mini: Path):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # --project under a regular file (root ignores chmod, so no read-only dir)
    res, last = _run(str(coco_mini / "images"), "--weights", str(eager_weights), "--device", "cpu", "--imgsz", "128",
                     "--project", str(blocker / "sub"))
    assert res.exit_code == 1 and res.output.count("Error:") == 1
    assert last == f"Error: cannot create a run folder under {blocker / 'sub'}: {blocker} is a file, not a folder; use " \
                   "--project with a writable folder"


def test_predict_json_write_failure_is_one_line(eager_weights: Path, tmp_path: Path, monkeypatch):
    import errno

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)  # the write of predictions.json fails
    img = tmp_path / "a.jpg"
    cv2.imwrite(str(img), np.full((64, 64, 3), 90, np.uint8))
    res, last = _run(str(img), "--weights", str(eager_weights), "--device", "cpu", "--imgsz", "128", "--nosave",
                     "--project", str(tmp_path / "runs"))
    assert res.exit_code == 1
    assert last.startswith("Error: cannot write ") and "predictions.json: No space left on device" in last
    assert not list((tmp_path / "runs").rglob("*.tmp"))


def test_predict_skips_non_media_and_unreadable_files_and_counts_them(eager_weights: Path, tmp_path: Path,
                                                                      coco_mini: Path):
    src = tmp_path / "mixed"
    src.mkdir()
    for p in sorted((coco_mini / "images").glob("*.jpg"))[:2]:
        (src / p.name).write_bytes(p.read_bytes())
    (src / "notes.txt").write_text("x")
    (src / "broken.jpg").write_bytes(b"not a jpeg")
    (src / "clip.mp4").write_text("a text file renamed .mp4")
    res, last = _run(str(src), "--weights", str(eager_weights), "--device", "cpu", "--imgsz", "128",
                     "--project", str(tmp_path / "runs"))
    assert res.exit_code == 0, res.output
    final = res.stdout.strip().splitlines()[-2]  # (stderr holds the progress bar and one warning per file)
    assert final.startswith("2 frames") and final.endswith("1 non-media files skipped, 2 unreadable files skipped")
    assert last == f"Results saved to {tmp_path / 'runs' / 'exp'}"
    assert len(json.loads((tmp_path / "runs" / "exp" / "predictions.json").read_text())) > 0


@pytest.mark.parametrize("kind", ["text-renamed", "zero-frames"])
def test_predict_unreadable_video_fails_before_any_output(eager_weights: Path, tmp_path: Path, kind: str):
    video = tmp_path / "clip.mp4"
    if kind == "text-renamed":
        video.write_text("not a video")
    else:  # a valid mp4 container without frames
        cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 30, (64, 64)).release()
        assert video.stat().st_size > 0
    res, last = _run(str(video), "--weights", str(eager_weights), "--device", "cpu", "--imgsz", "128",
                     "--project", str(tmp_path / "runs"))
    assert res.exit_code == 1 and res.output.count("Error:") == 1
    assert last.startswith(f"Error: cannot open video/stream '{video}': it is missing, unreadable, not a video")
    assert not (tmp_path / "runs").exists()  # no empty run folder


def test_predict_lone_corrupt_image(eager_weights: Path, tmp_path: Path):
    img = tmp_path / "photo.jpg"
    img.write_bytes(b"\xff\xd8 truncated")
    res, last = _run(str(img), "--weights", str(eager_weights), "--device", "cpu", "--imgsz", "128",
                     "--project", str(tmp_path / "runs"))
    assert res.exit_code == 1 and res.output.count("Error:") == 1
    assert last == f"Error: cannot decode image {img}: the file is corrupt or not an image; remove or replace it"


@pytest.mark.skipif(Path("/dev/video0").exists(), reason="this machine has a camera")
def test_predict_webcam_without_camera(eager_weights: Path, tmp_path: Path):
    res, last = _run("0", "--weights", str(eager_weights), "--device", "cpu", "--imgsz", "128",
                     "--project", str(tmp_path / "runs"))
    assert res.exit_code == 1 and res.output.count("Error:") == 1
    assert last == "Error: cannot open webcam 0: no camera at that index (or it is in use); connect one, or give an " \
                   "image, video, folder or stream URL"
    assert not (tmp_path / "runs").exists()


def test_predict_very_large_image(tmp_path: Path):
    """8000x6000 works at a small input size: poses in original pixels, full-size drawing, sane memory."""
    import resource

    img = tmp_path / "huge.jpg"
    cv2.imwrite(str(img), np.full((6000, 8000, 3), 90, np.uint8))
    weights = tmp_path / "n.pt"
    save_checkpoint(weights, eager_model(), extra={"epoch": 0})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    res, last = _run(str(img), "--weights", str(weights), "--device", "cpu", "--imgsz", "128", "--conf", "0.9",
                     "--project", str(tmp_path / "runs"))
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert res.exit_code == 0, res.output
    assert grown < 1.5 * 2**20, f"peak memory grew by {grown / 2**20:.1f} GiB"  # the image is 0.14 GB
    out = tmp_path / "runs" / "exp"
    assert cv2.imread(str(out / "huge.jpg")).shape == (6000, 8000, 3)
    records = json.loads((out / "predictions.json").read_text())
    assert records and max(max(r["keypoints"][0::3]) for r in records) > 1000  # original pixels, not 128-px ones


def test_predict_paths_with_spaces_and_non_ascii(eager_weights: Path, tmp_path: Path, coco_mini: Path):
    src = tmp_path / "my photos ñ" / "图 片"
    src.mkdir(parents=True)
    jpg = sorted((coco_mini / "images").glob("*.jpg"))[0]
    (src / "foto 1 é.jpg").write_bytes(jpg.read_bytes())
    out = tmp_path / "salida ü"
    res, last = _run(str(src), "--weights", str(eager_weights), "--device", "cpu", "--imgsz", "128",
                     "--project", str(out))
    assert res.exit_code == 0, res.output
    assert cv2.imdecode(np.fromfile(str(out / "exp" / "foto 1 é.jpg"), np.uint8), cv2.IMREAD_COLOR) is not None
    assert json.loads((out / "exp" / "predictions.json").read_text())[0]["file"] == "foto 1 é.jpg"


def test_video_sink_writes_in_order_and_reports_errors(tmp_path: Path):
    from kapao.errors import DataError
    from kapao.sinks import _VideoSink

    class Recorder:
        def __init__(self, fail_at: int | None = None) -> None:
            self.frames, self.fail_at, self.released = [], fail_at, False

        def write(self, img: np.ndarray) -> None:
            if len(self.frames) == self.fail_at:
                raise OSError("No space left on device")
            self.frames.append(int(img[0, 0, 0]))

        def release(self) -> None:
            self.released = True

    ok = Recorder()
    sink = _VideoSink(ok, tmp_path / "a.mp4", prefetch=2)
    for i in range(20):
        sink.put(lambda i=i: np.full((2, 2, 3), i, np.uint8))
    sink.release()
    assert ok.frames == list(range(20)) and ok.released

    bad = Recorder(fail_at=3)
    sink = _VideoSink(bad, tmp_path / "b.mp4", prefetch=2)
    with pytest.raises(DataError, match=r"cannot write video .*b\.mp4: No space left"):
        for i in range(20):
            sink.put(lambda i=i: np.full((2, 2, 3), i, np.uint8))
        sink.release()
    assert bad.frames == [0, 1, 2]
