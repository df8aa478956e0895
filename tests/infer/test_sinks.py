"""Where predictions go (kapao.infer.sinks): the JSONL sink's flushing, the sink fan-out."""
from __future__ import annotations

import json
from pathlib import Path

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


