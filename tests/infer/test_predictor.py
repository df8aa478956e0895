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

from kapao.cfg.settings import PREDICT_SETTINGS
from kapao.cli.main import cli
from kapao.infer.predictor import KAPAO, Predictor, prepare_batch
from kapao.models.network import kapao_n
from kapao.poses import Poses
from kapao.weights.checkpoint import save_checkpoint


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
    assert files == sorted([p.name for p in (coco_mini / "images").glob("*.jpg")] +
                           ["args.yaml", "predictions.json", "predictions.jsonl"])
    res = runner.invoke(cli, ["predict", str(coco_mini / "images" / "*0785.jpg"), *args, "--nosave"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "exp2").iterdir()) == ["args.yaml", "predictions.json", "predictions.jsonl"]
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

    fsync = os.fsync

    def full(fd):
        if "/.predictions.json." in os.readlink(f"/proc/self/fd/{fd}"):  # atomic_write's temporary file
            raise OSError(errno.ENOSPC, "No space left on device")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", full)  # the write of predictions.json fails
    img = tmp_path / "a.jpg"
    cv2.imwrite(str(img), np.full((64, 64, 3), 90, np.uint8))
    res, last = _run(str(img), "--weights", str(eager_weights), "--device", "cpu", "--imgsz", "128", "--nosave",
                     "--project", str(tmp_path / "runs"))
    assert res.exit_code == 1
    assert last.startswith("Error: cannot write ") and "predictions.json: No space left on device" in last
    assert not list((tmp_path / "runs").rglob("*.tmp"))
    assert len((tmp_path / "runs" / "exp" / "predictions.jsonl").read_bytes().splitlines()) == 1  # the stream is kept


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


@pytest.mark.slow
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
    from kapao.infer.sinks import _VideoSink

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


def test_prepare_batch_very_thin_image_keeps_a_row():
    x, metas = prepare_batch([np.zeros((1, 3000, 3), np.uint8)], 256)  # 1 * 256/3000 rounds to 0 rows
    assert tuple(x.shape) == (1, 3, 64, 256) and metas[0]["orig_shape"] == (1, 3000)


def test_predict_same_file_names_in_different_folders_stay_apart(eager_weights: Path, tmp_path: Path):
    for i, folder in enumerate(("a", "b")):
        (tmp_path / folder).mkdir()
        cv2.imwrite(str(tmp_path / folder / "img.jpg"), np.full((64 + 16 * i, 96, 3), 60, np.uint8))
    cv2.imwrite(str(tmp_path / "a" / "img_2.jpg"), np.full((32, 96, 3), 30, np.uint8))  # the suffix is taken too
    res = CliRunner().invoke(cli, ["predict", str(tmp_path / "*" / "img*.jpg"), "--weights", str(eager_weights),
                                   "--imgsz", "128", "--device", "cpu", "--project", str(tmp_path / "runs")])
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "exp"
    assert sorted(p.name for p in run.glob("*.jpg")) == ["img.jpg", "img_2.jpg", "img_3.jpg"]
    recs = json.loads((run / "predictions.json").read_text())
    assert {r["file"] for r in recs} == {"a/img.jpg", "a/img_2.jpg", "b/img.jpg"}  # relative to the common folder
    heights = sorted(cv2.imread(str(p)).shape[0] for p in run.glob("*.jpg"))
    assert heights == [32, 64, 80]  # three drawn images, none overwritten


def test_predict_failing_run_leaves_no_result_folder(eager_weights: Path, tmp_path: Path, monkeypatch):
    img = tmp_path / "a.jpg"
    cv2.imwrite(str(img), np.full((64, 64, 3), 90, np.uint8))
    monkeypatch.setattr(Predictor, "predict_images", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    res, last = _run(str(img), "--weights", str(eager_weights), "--device", "cpu", "--imgsz", "128",
                     "--project", str(tmp_path / "runs"))
    assert res.exit_code == 1 and last == "Error: unexpected RuntimeError: boom (a bug? rerun with --verbose for the " \
                                          "traceback and report it)"
    assert not (tmp_path / "runs" / "exp").exists()  # no predictions.json = [] that reads as "nobody there"


# ----------------------------------------------------------------------------------------------
# Results that stream (predictions.jsonl) and survive (--resume)

def _jsonl(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "predictions.jsonl").read_bytes().splitlines()]


def _image_folder(root: Path, n: int, size=(240, 320), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        cv2.imwrite(str(root / f"im{i:03d}.jpg"), rng.integers(0, 255, (*size, 3), dtype=np.uint8))
    return root


def test_predict_streams_jsonl_and_builds_todays_json_from_it(eager_weights: Path, coco_mini: Path, tmp_path: Path):
    api = KAPAO(eager_weights, device="cpu")
    run = api.run(coco_mini / "images", imgsz=128, project=tmp_path, save=False, keep_results=True)
    lines = _jsonl(run.save_dir)
    names = sorted(p.name for p in (coco_mini / "images").glob("*.jpg"))
    assert [r["source"] for r in lines] == names and len(run.results) == 4
    for rec, poses in zip(lines, run.results):
        assert set(rec) == {"source", "frame", "time", "image_id", "poses"} and rec["frame"] is None
        assert len(rec["poses"]) == len(poses) > 0
        p = rec["poses"][0]
        assert set(p) == {"box", "score", "keypoints", "confidences", "fused", "track_id"} and p["track_id"] is None
        assert torch.equal(torch.tensor(p["confidences"]), poses.keypoints[0, :, 2])
        assert p["fused"] == poses.fused[0].tolist()
    # predictions.json, built from the stream, is what the in-memory writer used to dump
    expected = []
    for name, poses in zip(names, run.results):
        stem = Path(name).stem
        expected += [dict(r, file=name) for r in poses.to_coco(int(stem) if stem.isdigit() else stem)]
    assert run.json_path.read_text() == json.dumps(expected)
    assert KAPAO(eager_weights, device="cpu").run(coco_mini / "images", imgsz=128, project=tmp_path,
                                                  save=False).results == []  # nothing kept unless asked


def test_same_file_names_in_two_folders_stay_apart(eager_weights: Path, tmp_path: Path):
    _image_folder(tmp_path / "src" / "a", 1)
    _image_folder(tmp_path / "src" / "b", 1, seed=1)
    run = KAPAO(eager_weights, device="cpu").run(str(tmp_path / "src" / "*" / "im000.jpg"), imgsz=128,
                                                 project=tmp_path / "runs", save=False)
    assert [r["source"] for r in _jsonl(run.save_dir)] == ["a/im000.jpg", "b/im000.jpg"]
    assert {r["file"] for r in json.loads(run.json_path.read_text())} == {"a/im000.jpg", "b/im000.jpg"}


@pytest.mark.slow
def test_resume_skips_done_images_drops_a_cut_line_and_appends(eager_weights: Path, tmp_path: Path):
    src = _image_folder(tmp_path / "src", 5)
    api = KAPAO(eager_weights, device="cpu")
    full = api.run(src, imgsz=128, project=tmp_path / "ref")
    part = api.run(src, imgsz=128, project=tmp_path / "runs")
    jsonl = part.save_dir / "predictions.jsonl"
    lines = jsonl.read_bytes().splitlines(keepends=True)
    jsonl.write_bytes(b"".join(lines[:2]) + lines[2][: len(lines[2]) // 2])  # killed while writing line 3
    (part.save_dir / "predictions.json").unlink()
    run = api.run(None, imgsz=128, project=tmp_path / "runs", resume=part.save_dir)
    assert run.resumed == 2 and run.frames == 3 and run.save_dir == part.save_dir
    assert [r["source"] for r in _jsonl(run.save_dir)] == [f"im{i:03d}.jpg" for i in range(5)]
    assert run.json_path.read_text() == full.json_path.read_text()
    assert sorted(p.name for p in run.save_dir.glob("*.jpg")) == [f"im{i:03d}.jpg" for i in range(5)]
    again = api.run(src, imgsz=128, project=tmp_path / "runs", resume=True)  # the latest run of src: all done
    assert again.frames == 0 and again.resumed == 5 and again.json_path.read_text() == full.json_path.read_text()


@pytest.mark.slow
def test_resume_video_goes_on_after_the_last_frame(eager_weights: Path, test_video: Path, tmp_path: Path):
    api = KAPAO(eager_weights, device="cpu")
    run = api.run(test_video, imgsz=128, project=tmp_path)
    recs = _jsonl(run.save_dir)
    assert [(r["frame"], r["time"], r["image_id"]) for r in recs] == [(i, round(i / 30, 6), i) for i in range(5)]
    jsonl = run.save_dir / "predictions.jsonl"
    jsonl.write_bytes(b"".join(jsonl.read_bytes().splitlines(keepends=True)[:2]))
    again = api.run(test_video, imgsz=128, project=tmp_path, resume=run.save_dir)
    assert again.frames == 3 and [r["frame"] for r in _jsonl(run.save_dir)] == [0, 1, 2, 3, 4]
    assert _jsonl(run.save_dir) == recs  # the same lines as the uninterrupted run
    cap = cv2.VideoCapture(str(run.save_dir / "posetrack-000001_2.mp4"))  # the first drawn video is kept
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 3 and (run.save_dir / "posetrack-000001.mp4").exists()


def test_resume_cli_uses_the_runs_options_and_refuses_others(eager_weights: Path, tmp_path: Path):
    src = _image_folder(tmp_path / "src", 3)
    base = ["--weights", str(eager_weights), "--device", "cpu", "--project", str(tmp_path / "runs"), "--nosave"]
    res, last = _run(str(src), *base, "--resume")
    assert res.exit_code == 2 and "--resume" in res.output and "no predict run of" in res.output
    res, _ = _run(str(src), *base, "--imgsz", "128", "--conf", "0.6")
    assert res.exit_code == 0, res.output
    jsonl = tmp_path / "runs" / "exp" / "predictions.jsonl"
    jsonl.write_bytes(jsonl.read_bytes().splitlines(keepends=True)[0])
    res, last = _run("--resume", str(tmp_path / "runs" / "exp"), "--device", "cpu", "--nosave")  # all from args.yaml
    assert res.exit_code == 0, res.output
    assert "2 frames" in res.output and "1 already done" in res.output and len(_jsonl(tmp_path / "runs" / "exp")) == 3
    res, last = _run(str(src), *base, "--resume", "--conf", "0.5")
    assert res.exit_code == 2 and "conf 0.6 (given 0.5)" in res.output, res.output
    other = _image_folder(tmp_path / "other", 1)
    res, last = _run(str(other), *base, "--name", "exp", "--resume", str(tmp_path / "runs" / "exp"))
    assert res.exit_code == 2 and "source" in res.output
    res, last = _run(str(src), *base, "--resume", str(tmp_path / "nothing"))
    assert res.exit_code == 2 and "no predictions.jsonl there" in res.output
    assert len(_jsonl(tmp_path / "runs" / "exp")) == 3  # refused resumes changed nothing


@pytest.mark.slow
def test_sigkill_during_folder_predict_then_resume_gives_every_image_once(eager_weights: Path, tmp_path: Path):
    import signal
    import subprocess
    import sys
    import time
    from collections import Counter

    n = 24
    src = _image_folder(tmp_path / "src", n)
    project = tmp_path / "runs"
    args = [str(src), "--weights", str(eager_weights), "--imgsz", "192", "--max-det", "20", "--device", "cpu",
            "--project", str(project)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    child = subprocess.Popen([sys.executable, "-m", "kapao", "predict", *args], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    jsonl = project / "exp" / "predictions.jsonl"
    deadline = time.monotonic() + 120
    while child.poll() is None and time.monotonic() < deadline:
        if jsonl.exists() and jsonl.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    done = jsonl.read_bytes().count(b"\n")
    assert 3 <= done < n, f"the run must be killed part-way (killed after {done} of {n} lines)"
    assert not (project / "exp" / "predictions.json").exists()
    res = CliRunner().invoke(cli, ["predict", *args, "--resume"])
    assert res.exit_code == 0, res.output
    assert f"{done} already done" in res.output
    recs = _jsonl(project / "exp")
    counts = Counter(r["source"] for r in recs)
    assert set(counts) == {f"im{i:03d}.jpg" for i in range(n)} and set(counts.values()) == {1}
    results = json.loads((project / "exp" / "predictions.json").read_text())
    per_file = Counter(r["file"] for r in results)
    assert per_file == Counter({r["source"]: len(r["poses"]) for r in recs}) and len(per_file) == n
    assert sorted(p.name for p in (project / "exp").glob("*.jpg")) == [f"im{i:03d}.jpg" for i in range(n)]


def test_run_applies_frame_transforms_before_the_sinks(eager_weights: Path, coco_mini: Path, tmp_path: Path):
    seen = []

    def tag(frame, poses):  # e.g. a tracker: give every pose an id
        seen.append(Path(frame.path).name)
        return Poses(poses.boxes, poses.scores, poses.keypoints, poses.kp_objects, poses.fused,
                     torch.arange(len(poses), dtype=torch.int64) + 100)

    run = KAPAO(eager_weights, device="cpu").run(coco_mini / "images", imgsz=128, project=tmp_path, save=False,
                                                 transforms=[tag], keep_results=True)
    assert seen == sorted(p.name for p in (coco_mini / "images").glob("*.jpg"))
    recs = _jsonl(run.save_dir)
    assert [p["track_id"] for p in recs[0]["poses"]] == list(range(100, 100 + len(recs[0]["poses"])))
    assert run.results[0].track_ids is not None
