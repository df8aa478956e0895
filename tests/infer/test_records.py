"""The record format of a predict run (kapao.infer.records): a frame's JSONL line <-> Poses, exactly; the
JSONL file read back; COCO JSON from the stream; source names."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from kapao.data.sources import Frame, SourceSpec
from kapao.infer.records import (
    frame_record,
    image_id_of,
    pose_records,
    poses_from_records,
    read_records,
    source_name,
    source_root,
    write_coco_json,
)
from kapao.poses import Poses

K = 5


def sample_poses(n: int = 3, seed: int = 0, track: bool = False) -> Poses:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 300
    boxes = torch.cat((xy, xy + torch.rand(n, 2, generator=g) * 90 + 1), 1)
    kp = torch.cat((torch.rand(n, K, 2, generator=g) * 400, torch.rand(n, K, 1, generator=g)), -1)
    return Poses(boxes, torch.rand(n, generator=g), kp, fused=torch.rand(n, K, generator=g) < 0.5,
                 track_ids=torch.arange(n, dtype=torch.int64) + 7 if track else None)


def sample_frame(path: str = "/data/img/a.jpg", frame: int | None = None, fps: float | None = None) -> Frame:
    return Frame(np.zeros((4, 4, 3), np.uint8), path, frame, fps)


def test_pose_records_round_trip_exactly_and_name_every_field():
    for track in (False, True):
        p = sample_poses(track=track)
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
    assert all(len(repr(v)) <= 12 for v in pose_records(sample_poses())[0]["confidences"])


def test_frame_record_image_and_video():
    rec = frame_record(sample_frame("/data/img/0785.jpg"), "img/0785.jpg", sample_poses(1))
    assert rec["source"] == "img/0785.jpg" and rec["frame"] is None and rec["time"] is None
    assert rec["image_id"] == 785 and len(rec["poses"]) == 1
    rec = frame_record(sample_frame("/v/clip.mp4", 45, 30.0), "clip.mp4", Poses.empty(K))
    assert rec["frame"] == 45 and rec["time"] == 1.5 and rec["image_id"] == 45 and rec["poses"] == []


def write_jsonl(path: Path, records: list[dict], tail: bytes = b"") -> None:
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in records) + tail)


def test_coco_json_from_the_stream_equals_to_coco_of_the_poses(tmp_path: Path):
    frames = [(sample_frame("/d/0001.jpg"), "0001.jpg", sample_poses(3, 1)),
              (sample_frame("/d/x/b.jpg"), "x/b.jpg", Poses.empty(K)),
              (sample_frame("/d/v.mp4", 0, 30.0), "v.mp4", sample_poses(2, 2))]
    path = tmp_path / "predictions.jsonl"
    write_jsonl(path, [frame_record(f, name, p) for f, name, p in frames])
    out = write_coco_json(path, tmp_path / "predictions.json", K)
    expected = []
    for f, name, p in frames:
        expected += [dict(r, file=name) for r in p.to_coco(image_id_of(f))]
    assert out.read_text() == json.dumps(expected)  # byte for byte what json.dump of the records gave
    assert len(expected) == 5
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert json.loads(write_coco_json(tmp_path / "empty.jsonl", tmp_path / "e.json", K).read_text()) == []


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


def test_jsonl_lines_to_poses_and_back_are_byte_identical(tmp_path: Path):
    """A run's predictions.jsonl read into Poses and written again gives the same bytes (images, video frames,
    tracked and untracked poses, empty frames), as JsonlSink writes it."""
    frames = [(sample_frame("/d/0001.jpg"), "0001.jpg", sample_poses(3, 1)),
              (sample_frame("/d/x/b.jpg"), "x/b.jpg", Poses.empty(K)),
              (sample_frame("/d/v.mp4", 7, 29.97), "v.mp4", sample_poses(2, 2, track=True))]
    lines = [json.dumps(frame_record(f, name, p), separators=(",", ":")).encode() + b"\n" for f, name, p in frames]
    path = tmp_path / "predictions.jsonl"
    path.write_bytes(b"".join(lines))
    again = b""
    for (f, _, _), rec in zip(frames, read_records(path)):
        poses = poses_from_records(rec["poses"], K)
        again += json.dumps(frame_record(f, rec["source"], poses), separators=(",", ":")).encode() + b"\n"
    assert again == path.read_bytes()
    assert b'"track_id":7' in lines[2] and b'"track_id":null' in lines[0]  # both kinds were in the file
