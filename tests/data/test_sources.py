"""Predict sources: files, folders, globs, videos, webcams, streams."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from kapao.data.sources import VideoReader, default_source, load_image, probe_image, resolve_source
from kapao.errors import DataError


def test_default_source_is_ultralytics_assets():
    spec = resolve_source(None)
    assert spec.kind == "images" and {Path(p).name for p in spec.items} >= {"bus.jpg", "zidane.jpg"}
    assert Path(spec.items[0]).parent == default_source()


def test_file_folder_glob(coco_mini: Path, tmp_path: Path):
    imgs = sorted((coco_mini / "images").glob("*.jpg"))
    assert resolve_source(imgs[0]).items == [str(imgs[0])]
    spec = resolve_source(coco_mini / "images")
    assert spec.kind == "images" and len(spec) == 4 and spec.skipped == 0
    assert len(resolve_source(str(coco_mini / "images" / "0000*.jpg"))) == 4
    # non-image files are skipped and counted
    for i, p in enumerate(imgs[:2]):
        (tmp_path / p.name).write_bytes(p.read_bytes())
    (tmp_path / "notes.txt").write_text("x")
    spec = resolve_source(tmp_path)
    assert len(spec) == 2 and spec.skipped == 1


def test_video_and_stream(test_video: Path):
    spec = resolve_source(test_video)
    assert spec.kind == "video" and spec.is_video(spec.items[0])
    reader = VideoReader(spec.items[0])
    frames = list(reader)
    assert (reader.width, reader.height, reader.fps, reader.frame_count) == (1280, 720, 30.0, 5)
    assert [f.frame for f in frames] == [0, 1, 2, 3, 4] and frames[0].image.shape == (720, 1280, 3)
    assert resolve_source("0").kind == "stream" and resolve_source("rtsp://host/cam").kind == "stream"


def test_video_reader_close_early(test_video: Path):
    reader = VideoReader(str(test_video), prefetch=1)
    first = next(iter(reader))
    reader.close()
    assert first.image.dtype == np.uint8 and not reader._thread.is_alive()


@pytest.mark.parametrize("make, match", [
    (lambda d: d / "missing.jpg", "does not exist"),
    (lambda d: d, "is empty"),
    (lambda d: (d / "a.txt").write_text("x") and d, "no image or video"),
    (lambda d: str(d / "*.png"), "matches no files"),
])
def test_bad_sources(tmp_path: Path, make, match):
    with pytest.raises(DataError, match=match):
        resolve_source(make(tmp_path))


def test_unreadable_video(tmp_path: Path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(DataError, match="cannot open"):
        VideoReader(str(bad))


def test_no_webcam():
    with pytest.raises(DataError, match="webcam"):
        VideoReader("9")


def test_load_image_formats_and_exif(tmp_path):
    from PIL import Image

    gray = np.tile(np.arange(40, dtype=np.uint8), (30, 1))
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    cv2.imwrite(str(tmp_path / "g16.png"), gray.astype(np.uint16) * 256)
    cv2.imwrite(str(tmp_path / "rgba.png"), np.dstack([np.full((30, 40, 3), 7, np.uint8), np.zeros((30, 40), np.uint8)]))
    for name in ("g.png", "g16.png", "rgba.png"):
        img = load_image(tmp_path / name)
        assert img.shape == (30, 40, 3) and img.dtype == np.uint8, name
    assert load_image(tmp_path / "g16.png")[0, 39, 0] == 39  # 16-bit scaled down, not clipped
    pil = Image.fromarray(np.zeros((30, 40, 3), np.uint8))
    exif = pil.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    pil.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").shape == (40, 30, 3)
    assert probe_image(tmp_path / "rot.jpg") == ("ok", (30, 40), (40, 30))
    with pytest.raises(DataError, match="nope.jpg"):
        load_image(tmp_path / "nope.jpg")
