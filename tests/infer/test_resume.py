"""Predict run folders and --resume (kapao.infer.resume): which run is continued, with which options."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml

from kapao.data.sources import SourceSpec
from kapao.errors import ConfigError
from kapao.infer.resume import RUN_ARGS, check_resume, find_resume_run, open_run_dir, read_run_args, source_key


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
    with pytest.raises(ConfigError, match="args.yaml: expected a mapping"):
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
