"""Predict run folders: what a run records (args.yaml) and how --resume finds and continues one.

A run folder holds args.yaml (SOURCE, weights, imgsz, inference settings) from its start, and the
stream of results (:mod:`kapao.infer.records`, predictions.jsonl). A resumed run must go on with the same
SOURCE and options; the images and video frames its JSONL holds (its :class:`Progress`) are skipped.
"""
from __future__ import annotations

import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kapao.cfg.settings import read_yaml
from kapao.data.sources import STREAM_PREFIXES, SourceSpec, VideoReader
from kapao.errors import ConfigError, DataError
from kapao.infer.records import PREDICTIONS_JSONL, read_records
from kapao.runtime import RunLock, atomic_write, increment_run_dir

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
        data = read_yaml(run_dir / RUN_ARGS)
    except ConfigError as e:
        raise ConfigError(f"--resume {run_dir}: cannot read its {RUN_ARGS} ({e}); "
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
                 resume_dir: Path | None, wanted: bool,
                 names: set[str] | None = None) -> tuple[Path | None, Progress, RunLock]:
    """The run folder, what it already holds and its lock (held until released): the resumed one (locked
    first, then its JSONL read, an unfinished last line cut off, every record checked to be of this run and
    SOURCE: `args["run"]`, `names`), or the next runs/predict/expN with its args.yaml (`args` plus a new run id); the readers are
    closed when this fails. A folder another process writes to is refused (kapao.runtime.RunLock)."""
    lock = RunLock(resume_dir or ".")
    try:
        if resume_dir is not None:
            lock.acquire()
            return resume_dir, load_progress(resume_dir / PREDICTIONS_JSONL, args.get("run"), names), lock
        if not wanted:
            return None, Progress(), lock
        save_dir = increment_run_dir(project, name)
        lock = RunLock(save_dir).acquire()
        args["run"] = uuid.uuid4().hex[:12]
        try:
            with atomic_write(save_dir / RUN_ARGS, "w") as f:
                yaml.safe_dump(args, f, sort_keys=False)
        except OSError as e:
            lock.release()
            shutil.rmtree(save_dir, ignore_errors=True)  # still empty: leave no run folder behind
            raise DataError(f"cannot write {save_dir / RUN_ARGS}: {e.strerror or e}; free disk space") from None
        return save_dir, Progress(), lock
    except BaseException:
        lock.release()
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


def load_progress(path: Path, run: str | None = None, names: set[str] | None = None) -> Progress:
    """Read a run's predictions.jsonl for --resume; an unfinished last line is cut off the file first.

    Only records of this run are accepted: with `run`, each record's "run" must be it; with `names`
    (what SOURCE holds, as records name it), each record's source must be one of them; and no image may
    be recorded twice. Anything else (another process appended to the file) is a DataError naming the line.
    """
    progress = Progress()
    if not path.exists():
        return progress
    cut_unfinished_line(path)
    for i, rec in enumerate(read_records(path), 1):
        why = (f"is a record of another run ({rec.get('run')!r}; this run is {run!r})" if run and rec.get("run") != run
               else f"names {rec['source']!r}, which SOURCE does not hold" if names is not None and
               rec["source"] not in names
               else f"repeats {rec['source']!r}" if rec.get("frame") is None and rec["source"] in progress.images
               else None)
        if why:
            raise DataError(f"{path}: line {i} {why}: another process wrote into this run folder; start a new run "
                            "(drop --resume)")
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
