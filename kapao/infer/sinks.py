"""Where predictions go, frame by frame, as they are made: sinks fed by the predict loop.

The counterpart of :mod:`kapao.data.sources`: predict reads frames from a source and hands each frame's
Poses to a :class:`ResultWriter`, which feeds its sinks (open once, add per frame, close once):

* :class:`JsonlSink` -- ``predictions.jsonl``: one JSON line per frame/image, flushed after every
  line and fsync'ed at least every SYNC_SECONDS, so memory stays flat on an endless stream and a kill
  loses at most the line being written (a truncated last line is cut off by :func:`kapao.infer.resume.load_progress`);
* :class:`MediaSink` -- drawn images and videos (and the --show window);
* any extra :class:`Sink` (e.g. a CSV export).

At close the COCO-format ``predictions.json`` is built from the JSONL file (:func:`kapao.infer.records.write_coco_json`),
streamed and written atomically, never from results held in memory.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import cv2
import numpy as np

from kapao.cfg.schema import KeypointSchema
from kapao.data.sources import Frame, opencv_safe
from kapao.draw import draw_poses, write_image
from kapao.errors import DataError
from kapao.infer.options import DrawOptions
from kapao.infer.records import PREDICTIONS_JSON, PREDICTIONS_JSONL, frame_record, source_name, write_coco_json
from kapao.poses import Poses

SYNC_SECONDS = 1.0  # predictions.jsonl reaches the disk (fsync) at least this often; the OS gets every line at once


class Sink(Protocol):
    """Receives every frame's poses in order: open(run folder or None) once, add() per frame, close() once
    (also after an error). Extra sinks are passed to ``KAPAO.run(sinks=...)``."""

    def open(self, save_dir: Path | None) -> None: ...

    def add(self, frame: Frame, poses: Poses) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """Appends one JSON line per frame to ``save_dir/predictions.jsonl`` (see :func:`frame_record`)."""

    def __init__(self, root: Path | None = None, run: str | None = None, name: str = PREDICTIONS_JSONL) -> None:
        self.root, self.run, self.name = root, run, name  # name: a path inside the run folder (a rank's part: parts/…)
        self.path: Path | None = None
        self._file: Any = None
        self._synced = 0.0

    def open(self, save_dir: Path | None) -> None:
        if save_dir is None:
            raise ValueError("JsonlSink needs a run folder")
        self.path = save_dir / self.name
        try:
            self._file = open(self.path, "ab")  # closed in close()
        except OSError as e:
            raise DataError(f"cannot write {self.path}: {e.strerror or e}; use --project with a writable folder") from None
        self._synced = time.monotonic()

    def add(self, frame: Frame, poses: Poses) -> None:
        rec = frame_record(frame, source_name(frame.path, self.root), poses, self.run)
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


class _VideoSink:
    """Draws and encodes the frames of one output video in a background thread (bounded queue), so that
    drawing and mp4 encoding (OpenCV releases the GIL) overlap the next frame's inference."""

    def __init__(self, writer: cv2.VideoWriter, path: Path, prefetch: int = 8) -> None:
        self.writer, self.path, self.frames = writer, path, 0
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self.writer.write(job())
                    self.frames += 1
                except Exception as e:  # noqa: BLE001 - reported on the main thread by put()/release()
                    self._error = e

    def _check(self) -> None:
        if self._error is not None:
            raise DataError(f"cannot write video {self.path}: {self._error}; check the output folder and free space")

    def put(self, make_image: Callable[[], np.ndarray]) -> None:
        self._check()
        self._queue.put(make_image)

    def release(self) -> None:
        """Finish the file, then read its frame count back: OpenCV reports no write error (a full disk
        leaves a cut, unplayable file behind a success), so a file short of frames is a DataError."""
        self._queue.put(None)
        self._thread.join()
        self.writer.release()
        self._check()
        cap = cv2.VideoCapture(str(self.path))
        readable = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if cap.isOpened() else 0
        cap.release()
        if readable < self.frames:
            free = shutil.disk_usage(self.path.parent).free
            raise DataError(f"cannot write video {self.path}: {readable} of its {self.frames} frames reached the file "
                            f"({free >> 20} MiB free on its disk: full?); free disk space or use --project elsewhere")


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
        assert self.save_dir is not None  # self.save is only true with a save_dir (see open)
        if frame.frame is None:
            write_image(self.save_dir / self.drawn_name(frame.path), img)
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
            assert self.save_dir is not None  # only called when saving
            if not opencv_safe(name):  # OpenCV crashes on such a name: undecodable bytes written as \xff
                name = os.fsencode(name).decode("utf-8", "backslashreplace")
            out = _unused(self.save_dir / f"{name}.mp4")
            h, w = frame.image.shape[:2]
            writer = cv2.VideoWriter(str(out), cv2.VideoWriter.fourcc(*"mp4v"), frame.fps or 30.0, (w, h))
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
                 sinks: Sequence[Sink] = (), run: str | None = None, jsonl: str = PREDICTIONS_JSONL) -> None:
        self.save_dir, self.schema, self.save_json = save_dir, schema, save_json and save_dir is not None
        self.jsonl = jsonl
        self.sinks: list[Sink] = [*([MediaSink(schema, draw, save_media, show)] if save_media or show else []), *sinks,
                                  *([JsonlSink(root, run, jsonl)] if self.save_json else [])]
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
        if not self.save_json or self.save_dir is None or self.jsonl != PREDICTIONS_JSONL:
            return None
        return write_coco_json(self.save_dir / PREDICTIONS_JSONL, self.save_dir / PREDICTIONS_JSON,
                               self.schema.num_keypoints)
