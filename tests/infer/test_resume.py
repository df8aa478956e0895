"""Predict run folders and --resume (kapao.infer.resume): which run is continued, with which options."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml

from kapao.data.sources import SourceSpec
from kapao.errors import ConfigError, DataError
from kapao.infer.records import frame_record
from kapao.infer.resume import (
    RUN_ARGS,
    check_resume,
    find_resume_run,
    load_progress,
    open_run_dir,
    read_run_args,
    source_key,
)
from tests.infer.test_records import sample_frame, sample_poses, write_jsonl


def _run_dir(project: Path, name: str, source: str, lines: int = 1, age: float = 0.0) -> Path:
    d = project / name
    d.mkdir(parents=True)
    (d / RUN_ARGS).write_text(yaml.safe_dump({"source": source_key(source), "imgsz": 640, "conf": 0.7}))
    jsonl = d / "predictions.jsonl"
    jsonl.write_text('{"source": "a.jpg", "frame": null, "poses": []}\n' * lines)
    t = time.time() - age
    os.utime(jsonl, (t, t))
    return d


def test_find_resume_run_latest_named_and_by_source(tmp_path: Path):
    project = tmp_path / "runs"
    old = _run_dir(project, "exp", "photos", age=100)
    new = _run_dir(project, "exp2", "videos", age=10)
    (project / "exp3").mkdir()  # a run without a JSONL is never resumed
    assert find_resume_run(True, project, "exp", None) == new
    assert find_resume_run("latest", project, "exp", "photos") == old  # the latest run of that SOURCE
    assert find_resume_run("latest", project, "exp2", "whatever") == new  # --name given: that run
    assert find_resume_run(str(old / "predictions.jsonl"), project, "exp", None) == old
    assert find_resume_run(old, project, "exp", None) == old
    with pytest.raises(ConfigError, match="no predict run of elsewhere to resume under"):
        find_resume_run(True, project, "exp", "elsewhere")
    with pytest.raises(ConfigError, match="no predictions.jsonl there"):
        find_resume_run(project / "exp3", project, "exp", None)
    with pytest.raises(ConfigError, match="no predict run"):
        find_resume_run(True, project, "exp3", None)


def test_read_run_args_and_check_resume(tmp_path: Path):
    d = _run_dir(tmp_path, "exp", "photos")
    stored = read_run_args(d)
    assert stored["source"] == os.path.abspath("photos")
    spec = SourceSpec("images", ["photos/a.jpg"], source="photos")
    check_resume(d, spec, stored, {"source": source_key("photos"), "imgsz": 640, "conf": 0.7, "weights": None})
    with pytest.raises(ConfigError, match=r"imgsz 640 \(given 320\); conf 0.7 \(given 0.5\)"):
        check_resume(d, spec, stored, {"source": source_key("photos"), "imgsz": 320, "conf": 0.5})
    with pytest.raises(ConfigError, match="is a stream"):
        check_resume(d, SourceSpec("stream", ["0"], source="0"), stored, {})
    (d / RUN_ARGS).write_text("- not a mapping\n")
    with pytest.raises(ConfigError, match="not a kapao predict record"):
        read_run_args(d)
    (d / RUN_ARGS).unlink()
    with pytest.raises(ConfigError, match="cannot read its args.yaml"):
        read_run_args(d)


def test_open_run_dir_new_and_resumed(tmp_path: Path):
    d, progress = open_run_dir(tmp_path / "runs", "exp", {}, {"source": "x", "imgsz": 64}, None, True)
    assert d == tmp_path / "runs" / "exp" and read_run_args(d)["imgsz"] == 64 and progress.lines == 0
    assert open_run_dir(tmp_path / "runs", "exp", {}, {}, None, False) == (None, progress.__class__())
    (d / "predictions.jsonl").write_bytes(b'{"source": "a.jpg", "frame": null, "poses": []}\n{"sour')
    again, progress = open_run_dir(tmp_path / "runs", "exp", {}, {}, d, True)
    assert again == d and progress.images == {"a.jpg"} and (d / "predictions.jsonl").read_bytes().endswith(b"]}\n")
    assert source_key("0") == "0" and source_key("rtsp://cam") == "rtsp://cam"


def test_load_progress_cuts_an_unfinished_line_and_knows_what_is_done(tmp_path: Path):
    recs = [frame_record(sample_frame("/d/a.jpg"), "a.jpg", sample_poses(1)),
            frame_record(sample_frame("/d/sub/a.jpg"), "sub/a.jpg", sample_poses(2)),
            *(frame_record(sample_frame("/d/v.mp4", i, 25.0), "v.mp4", sample_poses(1)) for i in range(3))]
    path = tmp_path / "predictions.jsonl"
    write_jsonl(path, recs, tail=b'{"source": "b.jpg", "frame": null, "poses": [{"box": [1, 2')
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
    write_jsonl(bad, recs[:1], tail=b"garbage\n" + json.dumps(recs[1]).encode() + b"\n")
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2 is not a kapao frame record"):
        load_progress(bad)
