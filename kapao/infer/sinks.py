"""Where predictions go, frame by frame, as they are made: sinks fed by the predict loop.

The counterpart of :mod:`kapao.data.sources`: predict reads frames from a source and hands each frame's
Poses to a :class:`ResultWriter`, which feeds its sinks (open once, add per frame, close once):

* :class:`JsonlSink` -- ``predictions.jsonl``: one JSON line per frame/image, flushed after every
  line and fsync'ed at least every SYNC_SECONDS, so memory stays flat on an endless stream and a kill
  loses at most the line being written (a truncated last line is cut off by :func:`load_progress`);
* :class:`MediaSink` -- drawn images and videos (and the --show window);
* any extra :class:`Sink` (e.g. a CSV export).

At close the COCO-format ``predictions.json`` is built from the JSONL file (:func:`write_coco_json`),
streamed and written atomically, never from results held in memory.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import cv2
import numpy as np
import torch

from kapao.cfg.schema import KeypointSchema
from kapao.data.sources import Frame, SourceSpec
from kapao.draw import draw_poses
from kapao.errors import DataError
from kapao.poses import Poses
from kapao.runtime import atomic_write

LOGGER = logging.getLogger(__name__)

PREDICTIONS_JSONL = "predictions.jsonl"
PREDICTIONS_JSON = "predictions.json"
SYNC_SECONDS = 1.0  # predictions.jsonl reaches the disk (fsync) at least this often; the OS gets every line at once


def image_id_of(frame: Frame) -> int | str:
    """COCO-style id: the frame index for videos, the file stem (as int when numeric) for images."""
    if frame.frame is not None:
        return frame.frame
    stem = Path(frame.path).stem
    return int(stem) if stem.isdigit() else stem


def source_root(spec: SourceSpec) -> Path | None:
    """The folder JSONL source names are relative to: a folder SOURCE itself, else the deepest folder
    holding every item (a glob over several folders keeps their sub-paths apart); None for streams."""
    if spec.kind == "stream" or not spec.items:
        return None
    given = Path(spec.source).expanduser()
    if given.is_dir():
        return Path(os.path.abspath(given))
    return Path(os.path.commonpath([os.path.dirname(os.path.abspath(i)) for i in spec.items]))


def source_name(item: str, root: Path | None) -> str:
    """How an image/video/stream is named in the JSONL: its path relative to `root` (POSIX), or as given."""
    return item if root is None else Path(os.path.relpath(os.path.abspath(item), root)).as_posix()


# ----------------------------------------------------------------------------------------------
# The JSONL record of a frame

def _short(t: torch.Tensor) -> list[float]:
    """Flat values, each the shortest decimal that reads back as the same float32 (exact and compact)."""
    return [float(str(v)) for v in t.detach().float().cpu().numpy().ravel()]


def pose_records(poses: Poses) -> list[dict[str, Any]]:
    """One dict per pose: box [x1, y1, x2, y2], score, keypoints [[x, y]] * K, confidences [K], fused [K],
    track_id (int; None when not tracked or in no confirmed track); original-image pixels."""
    n, k = len(poses), poses.num_keypoints
    boxes, scores = _short(poses.boxes), _short(poses.scores)
    xy, conf = _short(poses.keypoints[..., :2]), _short(poses.keypoints[..., 2])
    fused = poses.fused.cpu().tolist()
    ids = [None] * n if poses.track_ids is None else [int(i) if i >= 0 else None for i in poses.track_ids.tolist()]
    return [{"box": boxes[4 * i: 4 * i + 4], "score": scores[i],
             "keypoints": [xy[2 * (i * k + j): 2 * (i * k + j) + 2] for j in range(k)],
             "confidences": conf[i * k: (i + 1) * k], "fused": fused[i], "track_id": ids[i]} for i in range(n)]


def poses_from_records(records: Sequence[dict[str, Any]], num_keypoints: int) -> Poses:
    """The Poses (float32) a list of :func:`pose_records` dicts describes; exact for values they wrote."""
    if not records:
        return Poses.empty(num_keypoints)
    boxes = torch.tensor([r["box"] for r in records], dtype=torch.float32)
    xy = torch.tensor([r["keypoints"] for r in records], dtype=torch.float32).reshape(len(records), num_keypoints, 2)
    conf = torch.tensor([r["confidences"] for r in records], dtype=torch.float32)
    ids = [r.get("track_id") for r in records]
    return Poses(boxes, torch.tensor([r["score"] for r in records], dtype=torch.float32),
                 torch.cat((xy, conf[..., None]), -1), fused=torch.tensor([r["fused"] for r in records], dtype=torch.bool),
                 track_ids=None if all(i is None for i in ids) else
                 torch.tensor([-1 if i is None else i for i in ids], dtype=torch.int64))


def frame_record(frame: Frame, name: str, poses: Poses) -> dict[str, Any]:
    """The JSONL line of one frame: source, frame (None for images), time (s into a video), image_id, poses."""
    t = None if frame.frame is None or not frame.fps else round(frame.frame / frame.fps, 6)
    return {"source": name, "frame": frame.frame, "time": t, "image_id": image_id_of(frame), "poses": pose_records(poses)}


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """The frame records of a JSONL file, one at a time. An unfinished last line (no newline: a kill
    mid-write) is skipped; any other line that is not a JSON object raises DataError naming it."""
    with open(path, "rb") as f:
        for i, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                LOGGER.warning("%s: line %d is unfinished (the run was killed while writing it); ignored", path, i)
                return
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                rec = None
            if not isinstance(rec, dict) or "poses" not in rec or "source" not in rec:
                raise DataError(f"{path}: line {i} is not a kapao frame record; restore the file or start a new run "
                                "(drop --resume)")
            yield rec


def write_coco_json(jsonl: Path, out: Path, num_keypoints: int) -> Path:
    """COCO keypoint results of every record of `jsonl`, streamed into `out` (atomic): the same list
    ``Poses.to_coco`` gives, each result with ``file`` = the record's source name."""
    try:
        with atomic_write(out, "w") as f:
            f.write("[")
            sep = ""
            for rec in read_records(jsonl):
                for r, p in zip(poses_from_records(rec["poses"], num_keypoints).to_coco(rec["image_id"]), rec["poses"]):
                    r["file"] = rec["source"]
                    if p.get("track_id") is not None:
                        r["track_id"] = p["track_id"]
                    f.write(sep + json.dumps(r))
                    sep = ", "
            f.write("]")
    except OSError as e:
        raise DataError(f"cannot write {out}: {e.strerror or e}; free disk space or use --project with a "
                        "writable folder") from None
    return out


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


# ----------------------------------------------------------------------------------------------
# Sinks

class Sink(Protocol):
    """Receives every frame's poses in order: open(run folder or None) once, add() per frame, close() once
    (also after an error). Extra sinks are passed to ``KAPAO.run(sinks=...)``."""

    def open(self, save_dir: Path | None) -> None: ...

    def add(self, frame: Frame, poses: Poses) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """Appends one JSON line per frame to ``save_dir/predictions.jsonl`` (see :func:`frame_record`)."""

    def __init__(self, root: Path | None = None, name: str = PREDICTIONS_JSONL) -> None:
        self.root, self.name = root, name  # name: a path inside the run folder (a rank's part: parts/…)
        self.path: Path | None = None
        self._file: Any = None
        self._synced = 0.0

    def open(self, save_dir: Path | None) -> None:
        if save_dir is None:
            raise ValueError("JsonlSink needs a run folder")
        self.path = save_dir / self.name
        try:
            self._file = open(self.path, "ab")  # noqa: SIM115 - closed in close()
        except OSError as e:
            raise DataError(f"cannot write {self.path}: {e.strerror or e}; use --project with a writable folder") from None
        self._synced = time.monotonic()

    def add(self, frame: Frame, poses: Poses) -> None:
        rec = frame_record(frame, source_name(frame.path, self.root), poses)
        try:
            self._file.write(json.dumps(rec, separators=(",", ":")).encode() + b"\n")
            self._file.flush()  # the OS has every finished line: a killed process loses nothing more
            if time.monotonic() - self._synced >= SYNC_SECONDS:
                os.fsync(self._file.fileno())
                self._synced = time.monotonic()
        except OSError as e:
            raise DataError(f"cannot write {self.path}: {e.strerror or e}; free disk space") from None

    def close(self) -> None:
        if self._file is None:
            return
        f, self._file = self._file, None
        try:
            f.flush()
            os.fsync(f.fileno())
        except OSError as e:
            raise DataError(f"cannot write {self.path}: {e.strerror or e}; free disk space") from None
        finally:
            f.close()


@dataclass
class DrawOptions:
    show_boxes: bool = False
    show_scores: bool = False
    show_kp_objects: bool = False
    line_width: int | None = None
    fused_only: bool = False  # draw only keypoints confirmed by a keypoint object (Poses.fused)
    track_ids: bool = True  # label tracked poses with their id (they are coloured by track either way)


class _VideoSink:
    """Draws and encodes the frames of one output video in a background thread (bounded queue), so that
    drawing and mp4 encoding (OpenCV releases the GIL) overlap the next frame's inference."""

    def __init__(self, writer: cv2.VideoWriter, path: Path, prefetch: int = 8) -> None:
        self.writer, self.path = writer, path
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self.writer.write(job())
                except Exception as e:  # noqa: BLE001 - reported on the main thread by put()/release()
                    self._error = e

    def _check(self) -> None:
        if self._error is not None:
            raise DataError(f"cannot write video {self.path}: {self._error}; check the output folder and free space")

    def put(self, make_image: Callable[[], np.ndarray]) -> None:
        self._check()
        self._queue.put(make_image)

    def release(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self.writer.release()
        self._check()


def _unused(path: Path) -> Path:
    """`path`, or `stem_2.suffix`, `stem_3.suffix` … when it exists (a resumed run never overwrites)."""
    n = 2
    out = path
    while out.exists():
        out = path.with_name(f"{path.stem}_{n}{path.suffix}")
        n += 1
    return out


class MediaSink:
    """Drawn images (written at once) and videos (encoded in a background thread), and the --show window."""

    def __init__(self, schema: KeypointSchema, draw: DrawOptions, save: bool = True, show: bool = False) -> None:
        self.schema, self.draw, self.save, self.show = schema, draw, save, show
        self.save_dir: Path | None = None
        self._videos: dict[str, _VideoSink] = {}
        self.written = 0  # files written (a count: an endless run keeps no list)
        self._names: dict[str, str] = {}  # source image path -> its drawn file's name (see drawn_name)
        self._taken: set[str] = set()

    def drawn_name(self, path: str) -> str:
        """The drawn image's file name for source image `path`, unique in the session: a second source file
        with the same name (another folder of a glob) gets a suffix, `bus_2.jpg`, instead of overwriting the
        first one's drawing. (A frame redone by --resume writes its own name again.)"""
        if path not in self._names:
            p, n = Path(path), 1
            name = p.name
            while name in self._taken:
                n += 1
                name = f"{p.stem}_{n}{p.suffix}"
            self._names[path] = name
            self._taken.add(name)
        return self._names[path]

    def open(self, save_dir: Path | None) -> None:
        self.save_dir = save_dir
        self.save = self.save and save_dir is not None

    def add(self, frame: Frame, poses: Poses) -> None:
        if not (self.save or self.show):
            return
        p = poses.to("cpu")
        if frame.frame is not None and self.save and not self.show:  # drawn in the video's thread
            self._video_sink(frame).put(lambda: self._draw(frame.image, p))
            return
        img = self._draw(frame.image, p)
        if self.show:
            cv2.imshow("kapao", img)
            cv2.waitKey(1)
        if not self.save:
            return
        if frame.frame is None:
            out = self.save_dir / self.drawn_name(frame.path)
            if not cv2.imwrite(str(out), img):
                raise DataError(f"cannot write {out}; check that the output folder is writable and has space")
            self.written += 1
        else:
            self._video_sink(frame).put(lambda: img)

    def _draw(self, image: np.ndarray, p: Poses) -> np.ndarray:
        return draw_poses(image, p.boxes, p.keypoints, self.schema, scores=p.scores, kp_objects=p.kp_objects,
                          line_width=self.draw.line_width, show_boxes=self.draw.show_boxes,
                          show_scores=self.draw.show_scores, show_kp_objects=self.draw.show_kp_objects,
                          kp_threshold=None, keypoint_mask=p.fused if self.draw.fused_only else None,
                          track_ids=p.track_ids, show_track_ids=self.draw.track_ids)

    def _video_sink(self, frame: Frame) -> _VideoSink:
        key = frame.path
        if key not in self._videos:
            name = Path(key).stem if not key.isdigit() else f"webcam{key}"
            out = _unused(self.save_dir / f"{name}.mp4")
            h, w = frame.image.shape[:2]
            writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), frame.fps or 30.0, (w, h))
            if not writer.isOpened():
                raise DataError(f"cannot write video {out}; check that the output folder is writable")
            self._videos[key] = _VideoSink(writer, out)
            self.written += 1
        return self._videos[key]

    def close(self) -> None:
        sinks, self._videos = list(self._videos.values()), {}
        for sink in sinks:
            sink.release()
        if self.show:
            cv2.destroyAllWindows()


class ResultWriter:
    """Feeds every frame's poses to the run's sinks: drawn media (when `save_media` or `show`), `sinks`,
    and last predictions.jsonl (when `save_json`): a frame's JSONL line is its commit record -- once it is
    there, the frame's drawn image and extra outputs were made, so --resume may skip it. At close,
    predictions.json is built from the JSONL -- unless `jsonl` names a rank's part of a sharded run
    (:mod:`kapao.infer.shard` merges the parts and writes it then)."""

    def __init__(self, save_dir: Path | None, schema: KeypointSchema, draw: DrawOptions, save_media: bool = True,
                 show: bool = False, save_json: bool = True, root: Path | None = None,
                 sinks: Sequence[Sink] = (), jsonl: str = PREDICTIONS_JSONL) -> None:
        self.save_dir, self.schema, self.save_json = save_dir, schema, save_json and save_dir is not None
        self.jsonl = jsonl
        self.sinks: list[Sink] = [*([MediaSink(schema, draw, save_media, show)] if save_media or show else []), *sinks,
                                  *([JsonlSink(root, jsonl)] if self.save_json else [])]
        opened: list[Sink] = []
        try:
            for s in self.sinks:
                s.open(save_dir)
                opened.append(s)
        except BaseException:
            for s in opened:
                s.close()
            raise

    def add(self, frame: Frame, poses: Poses) -> None:
        for s in self.sinks:
            s.add(frame, poses)

    def close(self) -> Path | None:
        """Close every sink (all of them, even when one fails), then write predictions.json; its path."""
        error: BaseException | None = None
        for s in self.sinks:
            try:
                s.close()
            except BaseException as e:  # noqa: BLE001 - the first error is raised once all are closed
                error = error or e
        if error is not None:
            raise error
        if not self.save_json or self.jsonl != PREDICTIONS_JSONL:
            return None
        return write_coco_json(self.save_dir / PREDICTIONS_JSONL, self.save_dir / PREDICTIONS_JSON,
                               self.schema.num_keypoints)
