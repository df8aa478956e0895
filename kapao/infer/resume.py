"""Predict run folders: what a run records (args.yaml) and how --resume finds and continues one.

A run folder holds args.yaml (SOURCE, weights, imgsz, inference settings) from its start, and the
stream of results (:mod:`kapao.infer.records`, predictions.jsonl). A resumed run must go on with the same
SOURCE and options; the images and video frames its JSONL holds (its :class:`Progress`) are skipped.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kapao.data.sources import STREAM_PREFIXES, SourceSpec, VideoReader
from kapao.errors import ConfigError, DataError
from kapao.infer.records import PREDICTIONS_JSONL, read_records
from kapao.runtime import atomic_write, increment_run_dir

LOGGER = logging.getLogger(__name__)

RUN_ARGS = "args.yaml"  # what a predict run folder records about how it was made


def source_text(source: Any) -> str | None:
    """The SOURCE argument as text (None when not given)."""
    return None if source is None else source.source if isinstance(source, SourceSpec) else str(source)


def source_key(text: str) -> str:
    """SOURCE as a run folder remembers it: streams and webcams as given, paths and globs made absolute."""
    if text.isdigit() or text.lower().startswith(STREAM_PREFIXES):
        return text
    return os.path.abspath(os.path.expanduser(text))


def read_run_args(run_dir: Path) -> dict[str, Any]:
    """A predict run folder's args.yaml (ConfigError when it is missing or unreadable)."""
    try:
        data = yaml.safe_load((run_dir / RUN_ARGS).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"--resume {run_dir}: cannot read its {RUN_ARGS} ({getattr(e, 'strerror', None) or e}); "
                          "resume a folder made by kapao predict") from None
    if not isinstance(data, dict) or "source" not in data:
        raise ConfigError(f"--resume {run_dir}: {RUN_ARGS} is not a kapao predict record; resume a folder made by "
                          "kapao predict")
    return data


def find_resume_run(resume: bool | str | Path, project: str | Path, name: str, source: str | None) -> Path:
    """The run folder --resume continues: a folder (or its predictions.jsonl) as given; True/"latest":
    `project/name` when `name` is not the default "exp", else the newest run under `project` with a
    predictions.jsonl (of SOURCE, when given). ConfigError when there is none."""
    if resume is True or (isinstance(resume, str) and resume.strip() in ("", "latest")):
        if name != "exp":
            found = [Path(project) / name]
        else:
            runs = sorted((p.parent for p in Path(project).glob(f"*/{PREDICTIONS_JSONL}")),
                          key=lambda d: (d / PREDICTIONS_JSONL).stat().st_mtime, reverse=True)
            key = None if source is None else source_key(source)
            found = [d for d in runs if key is None or _stored_source(d) == key][:1]
        if not found or not (found[0] / PREDICTIONS_JSONL).is_file():
            of = f" of {source}" if source is not None else ""
            raise ConfigError(f"--resume: no predict run{of} to resume under {project} (a run folder with "
                              f"{PREDICTIONS_JSONL}); pass the run folder: --resume {project}/expN")
        return found[0]
    assert resume is not False  # callers only call this when resuming
    path = Path(resume).expanduser()
    run_dir = path.parent if path.name == PREDICTIONS_JSONL else path
    if not (run_dir / PREDICTIONS_JSONL).is_file():
        raise ConfigError(f"--resume {resume}: no {PREDICTIONS_JSONL} there; pass a run folder made by kapao predict")
    return run_dir


def _stored_source(run_dir: Path) -> str | None:
    try:
        return read_run_args(run_dir)["source"]
    except ConfigError:
        return None


def check_resume(run_dir: Path, spec: SourceSpec, stored: dict[str, Any], args: dict[str, Any]) -> None:
    """A resumed run goes on with its own SOURCE and options: anything else is a usage error."""
    if spec.kind == "stream":
        raise ConfigError(f"--resume: {spec.source} is a stream; resume works for images, folders, globs and video files")
    diff = [f"{k} {stored.get(k)!r} (given {v!r})" for k, v in args.items()
            if k in stored and stored[k] != v and not (k == "weights" and None in (stored[k], v))]
    if diff:
        raise ConfigError(f"--resume {run_dir}: the run was made with other options: {'; '.join(diff)}; give the "
                          "run's own options (see its args.yaml) or start a new run without --resume")


def open_run_dir(project: str | Path, name: str, readers: dict[str, VideoReader], args: dict[str, Any],
                  resume_dir: Path | None, wanted: bool) -> tuple[Path | None, Progress]:
    """The run folder and what it already holds: the resumed one (its JSONL read, an unfinished last line
    cut off), or the next runs/predict/expN with its args.yaml; the readers are closed when this fails."""
    try:
        if resume_dir is not None:
            return resume_dir, load_progress(resume_dir / PREDICTIONS_JSONL)
        if not wanted:
            return None, Progress()
        save_dir = increment_run_dir(project, name)
        try:
            with atomic_write(save_dir / RUN_ARGS, "w") as f:
                yaml.safe_dump(args, f, sort_keys=False)
        except OSError as e:
            shutil.rmtree(save_dir, ignore_errors=True)  # still empty: leave no run folder behind
            raise DataError(f"cannot write {save_dir / RUN_ARGS}: {e.strerror or e}; free disk space") from None
        return save_dir, Progress()
    except BaseException:
        for r in readers.values():
            r.close()
        raise


@dataclass
class Progress:
    """What a run's JSONL already holds: image sources done, and per video the last frame done."""

    images: set[str] = field(default_factory=set)
    frames: dict[str, int] = field(default_factory=dict)
    lines: int = 0

    def done(self, name: str, frame: int | None) -> bool:
        return name in self.images if frame is None else frame <= self.frames.get(name, -1)


def load_progress(path: Path) -> Progress:
    """Read a run's predictions.jsonl for --resume; an unfinished last line is cut off the file first."""
    progress = Progress()
    if not path.exists():
        return progress
    cut_unfinished_line(path)
    for rec in read_records(path):
        if rec.get("frame") is None:
            progress.images.add(rec["source"])
        else:
            progress.frames[rec["source"]] = max(int(rec["frame"]), progress.frames.get(rec["source"], -1))
        progress.lines += 1
    return progress


def cut_unfinished_line(path: Path, chunk: int = 1 << 16) -> None:
    """Truncate `path` after its last newline (reading backwards, so a large file is not read whole)."""
    size = end = path.stat().st_size
    with open(path, "rb+") as f:
        while end > 0:
            start = max(0, end - chunk)
            f.seek(start)
            block = f.read(end - start)
            nl = block.rfind(b"\n")
            if nl >= 0:
                keep = start + nl + 1
                break
            end = start
        else:
            keep = 0
        if keep < size:
            LOGGER.warning("%s: dropped an unfinished last line (%d bytes) left by a killed run", path, size - keep)
            f.truncate(keep)
