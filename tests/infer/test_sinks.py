"""Where predictions go (kapao.infer.sinks): the JSONL record, its flushing, resume progress, COCO JSON from
the stream, the sink fan-out, source names."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import kapao.infer.sinks as ks
from kapao.cfg.schema import KeypointSchema
from kapao.data.sources import Frame, SourceSpec
from kapao.errors import DataError
from kapao.infer.sinks import (
    DrawOptions,
    JsonlSink,
    ResultWriter,
    frame_record,
    load_progress,
    pose_records,
    poses_from_records,
    read_records,
    source_name,
    source_root,
    write_coco_json,
)
from kapao.poses import Poses

K = 5


def _poses(n: int = 3, seed: int = 0, track: bool = False) -> Poses:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 300
    boxes = torch.cat((xy, xy + torch.rand(n, 2, generator=g) * 90 + 1), 1)
    kp = torch.cat((torch.rand(n, K, 2, generator=g) * 400, torch.rand(n, K, 1, generator=g)), -1)
    return Poses(boxes, torch.rand(n, generator=g), kp, fused=torch.rand(n, K, generator=g) < 0.5,
                 track_ids=torch.arange(n, dtype=torch.int64) + 7 if track else None)


def _frame(path: str = "/data/img/a.jpg", frame: int | None = None, fps: float | None = None) -> Frame:
    return Frame(np.zeros((4, 4, 3), np.uint8), path, frame, fps)


def test_pose_records_round_trip_exactly_and_name_every_field():
    for track in (False, True):
        p = _poses(track=track)
        recs = json.loads(json.dumps(pose_records(p)))
        assert len(recs) == 3 and set(recs[0]) == {"box", "score", "keypoints", "confidences", "fused", "track_id"}
        assert len(recs[0]["keypoints"]) == K and len(recs[0]["keypoints"][0]) == 2 and len(recs[0]["confidences"]) == K
        back = poses_from_records(recs, K)
        assert torch.equal(back.boxes, p.boxes) and torch.equal(back.scores, p.scores)  # float32-exact
        assert torch.equal(back.keypoints, p.keypoints) and torch.equal(back.fused, p.fused)
        assert (back.track_ids is None) == (not track)
        if track:
            assert back.track_ids.tolist() == [7, 8, 9] and recs[2]["track_id"] == 9
    assert pose_records(Poses.empty(K)) == [] and len(poses_from_records([], K)) == 0
    # shortest decimals: no float64 noise such as 0.30000001192092896
    assert all(len(repr(v)) <= 12 for v in pose_records(_poses())[0]["confidences"])


def test_frame_record_image_and_video():
    rec = frame_record(_frame("/data/img/0785.jpg"), "img/0785.jpg", _poses(1))
    assert rec["source"] == "img/0785.jpg" and rec["frame"] is None and rec["time"] is None
    assert rec["image_id"] == 785 and len(rec["poses"]) == 1
    rec = frame_record(_frame("/v/clip.mp4", 45, 30.0), "clip.mp4", Poses.empty(K))
    assert rec["frame"] == 45 and rec["time"] == 1.5 and rec["image_id"] == 45 and rec["poses"] == []


def test_jsonl_sink_lines_are_on_disk_before_close_and_synced_every_second(tmp_path: Path, monkeypatch):
    clock, synced = [100.0], []
    monkeypatch.setattr(ks.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(ks.os, "fsync", lambda fd: synced.append(clock[0]))
    sink = JsonlSink(root=Path("/data"))
    sink.open(tmp_path)
    for i in range(5):
        sink.add(_frame(f"/data/img/{i}.jpg"), _poses(2, seed=i))
        clock[0] += 0.25
        lines = (tmp_path / "predictions.jsonl").read_bytes().splitlines()  # read by another file object
        assert len(lines) == i + 1 and json.loads(lines[-1])["source"] == f"img/{i}.jpg"
    assert synced == [101.0]  # 0.25 s per frame: one fsync, at the 5th line, once a second had passed
    sink.close()
    assert synced == [101.0, 101.25]  # and one at close
    sink.open(tmp_path)  # a resumed run appends
    sink.add(_frame("/data/img/9.jpg"), Poses.empty(K))
    sink.close()
    assert [r["source"] for r in read_records(tmp_path / "predictions.jsonl")][-2:] == ["img/4.jpg", "img/9.jpg"]


def _write_jsonl(path: Path, records: list[dict], tail: bytes = b"") -> None:
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in records) + tail)


def test_load_progress_cuts_an_unfinished_line_and_knows_what_is_done(tmp_path: Path):
    recs = [frame_record(_frame("/d/a.jpg"), "a.jpg", _poses(1)), frame_record(_frame("/d/sub/a.jpg"), "sub/a.jpg", _poses(2)),
            *(frame_record(_frame("/d/v.mp4", i, 25.0), "v.mp4", _poses(1)) for i in range(3))]
    path = tmp_path / "predictions.jsonl"
    _write_jsonl(path, recs, tail=b'{"source": "b.jpg", "frame": null, "poses": [{"box": [1, 2')
    size = len(path.read_bytes())
    progress = load_progress(path)
    assert progress.lines == 5 and progress.images == {"a.jpg", "sub/a.jpg"} and progress.frames == {"v.mp4": 2}
    assert progress.done("a.jpg", None) and not progress.done("b.jpg", None)
    assert progress.done("v.mp4", 2) and not progress.done("v.mp4", 3) and not progress.done("w.mp4", 0)
    assert path.read_bytes().endswith(b"\n") and len(path.read_bytes()) < size  # the half line is gone
    assert load_progress(path).lines == 5  # nothing more to cut
    assert load_progress(tmp_path / "missing.jsonl").lines == 0
    one = tmp_path / "one.jsonl"
    one.write_bytes(b'{"source": "a.j')  # only an unfinished line
    assert load_progress(one).lines == 0 and one.read_bytes() == b""
    bad = tmp_path / "bad.jsonl"
    _write_jsonl(bad, recs[:1], tail=b"garbage\n" + json.dumps(recs[1]).encode() + b"\n")
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2 is not a kapao frame record"):
        load_progress(bad)


def test_coco_json_from_the_stream_equals_to_coco_of_the_poses(tmp_path: Path):
    frames = [(_frame("/d/0001.jpg"), "0001.jpg", _poses(3, 1)), (_frame("/d/x/b.jpg"), "x/b.jpg", Poses.empty(K)),
              (_frame("/d/v.mp4", 0, 30.0), "v.mp4", _poses(2, 2))]
    path = tmp_path / "predictions.jsonl"
    _write_jsonl(path, [frame_record(f, name, p) for f, name, p in frames])
    out = write_coco_json(path, tmp_path / "predictions.json", K)
    expected = []
    for f, name, p in frames:
        expected += [dict(r, file=name) for r in p.to_coco(ks.image_id_of(f))]
    assert out.read_text() == json.dumps(expected)  # byte for byte what json.dump of the records gave
    assert len(expected) == 5
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert json.loads(write_coco_json(tmp_path / "empty.jsonl", tmp_path / "e.json", K).read_text()) == []


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
    w.add(_frame("/d/1.jpg"), _poses(2))
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


def test_source_names_keep_same_named_files_apart(tmp_path: Path):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "img.jpg").write_bytes(b"x")
    items = [str(tmp_path / "a" / "img.jpg"), str(tmp_path / "b" / "img.jpg")]
    root = source_root(SourceSpec("images", items, source=str(tmp_path / "*" / "img.jpg")))
    assert root == tmp_path and [source_name(i, root) for i in items] == ["a/img.jpg", "b/img.jpg"]
    folder = SourceSpec("images", items[:1], source=str(tmp_path / "a"))
    assert source_name(items[0], source_root(folder)) == "img.jpg"
    lone = SourceSpec("images", items[1:], source=items[1])
    assert source_name(items[1], source_root(lone)) == "img.jpg"
    stream = SourceSpec("stream", ["rtsp://cam/1"], source="rtsp://cam/1")
    assert source_root(stream) is None and source_name("rtsp://cam/1", None) == "rtsp://cam/1"


NON_UTF8_SCRIPT = r"""
import os, shutil, sys
import numpy as np
import torch
from kapao.cfg.schema import KeypointSchema
from kapao.data.sources import Frame, VideoReader, load_image
from kapao.infer.sinks import DrawOptions, MediaSink
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
