"""Where predictions go (kapao.infer.sinks): the JSONL sink's flushing, the sink fan-out."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import kapao.infer.sinks as ks
from kapao.cfg.schema import KeypointSchema
from kapao.errors import DataError
from kapao.infer.options import DrawOptions
from kapao.infer.records import read_records
from kapao.infer.sinks import JsonlSink, ResultWriter
from kapao.poses import Poses
from tests.infer.test_records import sample_frame, sample_poses

K = 5


def test_jsonl_sink_lines_are_on_disk_before_close_and_synced_every_second(tmp_path: Path, monkeypatch):
    clock, synced = [100.0], []
    monkeypatch.setattr(ks.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(ks.os, "fsync", lambda fd: synced.append(clock[0]))
    sink = JsonlSink(root=Path("/data"))
    sink.open(tmp_path)
    for i in range(5):
        sink.add(sample_frame(f"/data/img/{i}.jpg"), sample_poses(2, seed=i))
        clock[0] += 0.25
        lines = (tmp_path / "predictions.jsonl").read_bytes().splitlines()  # read by another file object
        assert len(lines) == i + 1 and json.loads(lines[-1])["source"] == f"img/{i}.jpg"
    assert synced == [101.0]  # 0.25 s per frame: one fsync, at the 5th line, once a second had passed
    sink.close()
    assert synced == [101.0, 101.25]  # and one at close
    sink.open(tmp_path)  # a resumed run appends
    sink.add(sample_frame("/data/img/9.jpg"), Poses.empty(K))
    sink.close()
    assert [r["source"] for r in read_records(tmp_path / "predictions.jsonl")][-2:] == ["img/4.jpg", "img/9.jpg"]


class _Recorder:
    def __init__(self, log: list, name: str, fail_close: bool = False) -> None:
        self.log, self.name, self.fail_close = log, name, fail_close

    def open(self, save_dir):
        self.log.append((self.name, "open", save_dir))

    def add(self, frame, poses):
        self.log.append((self.name, "add", frame.path, len(poses)))

    def close(self):
        self.log.append((self.name, "close"))
        if self.fail_close:
            raise OSError("disk full")


def test_result_writer_feeds_extra_sinks_and_closes_all_of_them(tmp_path: Path):
    schema = KeypointSchema(tuple(f"k{i}" for i in range(K)), tuple(range(K)), (0.05,) * K)
    log: list = []
    w = ResultWriter(tmp_path, schema, DrawOptions(), save_media=False, root=Path("/d"),
                     sinks=[_Recorder(log, "a", fail_close=True), _Recorder(log, "b")])
    w.add(sample_frame("/d/1.jpg"), sample_poses(2))
    with pytest.raises(OSError, match="disk full"):
        w.close()
    assert log == [("a", "open", tmp_path), ("b", "open", tmp_path), ("a", "add", "/d/1.jpg", 2),
                   ("b", "add", "/d/1.jpg", 2), ("a", "close"), ("b", "close")]
    assert [r["source"] for r in read_records(tmp_path / "predictions.jsonl")] == ["1.jpg"]
    (tmp_path / "r2").mkdir()
    w = ResultWriter(tmp_path / "r2", schema, DrawOptions(), save_media=False, save_json=False)
    assert w.sinks == [] and w.close() is None  # nothing asked for: no sink, no JSON
    w = ResultWriter(tmp_path / "r2", schema, DrawOptions(), sinks=[_Recorder([], "x")])
    assert [type(x).__name__ for x in w.sinks] == ["MediaSink", "_Recorder", "JsonlSink"]  # the JSONL line last
    w.close()
    with pytest.raises(DataError, match=r"cannot write .*missing.*predictions\.jsonl"):
        ResultWriter(tmp_path / "missing", schema, DrawOptions(), save_media=False)


NON_UTF8_SCRIPT = r"""
import os, shutil, sys
import numpy as np
import torch
from kapao.cfg.schema import KeypointSchema
from kapao.data.sources import Frame, VideoReader, load_image
from kapao.infer.options import DrawOptions
from kapao.infer.sinks import MediaSink
from kapao.poses import Poses

out = sys.argv[1]
image_name = os.fsdecode(b"bad\xffname.jpg")
video_name = os.fsdecode(b"bad\xfe\xffclip.mp4")
shutil.copy(sys.argv[2], os.path.join(out, video_name))
sink = MediaSink(KeypointSchema.for_count(17), DrawOptions())
sink.open(__import__("pathlib").Path(out) / "run")
os.makedirs(os.path.join(out, "run"))
empty = Poses.empty(17)
img = np.full((32, 48, 3), 120, np.uint8)
sink.add(Frame(img, os.path.join(out, image_name), None, None), empty)
frames = list(VideoReader(os.path.join(out, video_name)))
for f in frames:
    sink.add(f, empty)
sink.close()
print(len(frames), load_image(os.path.join(out, "run", image_name)).shape)
"""


def test_non_utf8_file_names_are_read_and_drawn_without_a_crash(tmp_path: Path, test_video: Path):
    """OpenCV crashes (SIGSEGV) on a str that is not valid UTF-8: drawn images go through imencode, videos
    are opened through a plain-named link and written under an escaped name. Run in a child process so a
    regression fails the test rather than the test session."""
    import os
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", NON_UTF8_SCRIPT, str(tmp_path), str(test_video)], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["5", "(32,", "48,", "3)"]
    names = sorted(os.listdir(os.fsencode(tmp_path / "run")))
    assert names == [b"bad\\xfe\\xffclip.mp4", b"bad\xffname.jpg"]


def test_a_video_cut_short_by_a_full_disk_is_an_error(tmp_path: Path):
    """OpenCV's writer reports nothing when the disk fills: the frames are counted back from the file."""
    class SilentWriter:  # what cv2.VideoWriter does on ENOSPC: accepts every frame, writes no file
        def write(self, image):
            pass

        def release(self):
            (tmp_path / "v.mp4").write_bytes(b"\x00" * 100)

    sink = ks._VideoSink(SilentWriter(), tmp_path / "v.mp4")
    for _ in range(3):
        sink.put(lambda: np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DataError, match=r"cannot write video .*v.mp4: 0 of its 3 frames reached the file .*MiB free"):
        sink.release()


