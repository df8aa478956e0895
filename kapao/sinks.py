"""Where predictions go: drawn images and videos, and a COCO-format predictions.json, in a run folder.

The counterpart of :mod:`kapao.sources`: predict reads frames from a source and hands each frame's
Poses to a :class:`ResultWriter`.
"""
from __future__ import annotations

import json
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from kapao.config import KeypointSchema
from kapao.draw import draw_poses
from kapao.errors import DataError
from kapao.postprocess import Poses
from kapao.runtime import atomic_write
from kapao.sources import Frame


def image_id_of(frame: Frame) -> int | str:
    """COCO-style id: the frame index for videos, the file stem (as int when numeric) for images."""
    if frame.frame is not None:
        return frame.frame
    stem = Path(frame.path).stem
    return int(stem) if stem.isdigit() else stem


@dataclass
class DrawOptions:
    show_boxes: bool = False
    show_scores: bool = False
    show_kp_objects: bool = False
    line_width: int | None = None
    fused_only: bool = False  # draw only keypoints confirmed by a keypoint object (confidence > 0)


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


class ResultWriter:
    """Writes drawn images/videos and a COCO-format predictions JSON into a run folder."""

    def __init__(self, save_dir: Path, schema: KeypointSchema, draw: DrawOptions, save_media: bool = True,
                 show: bool = False) -> None:
        self.save_dir, self.schema, self.draw, self.save_media = save_dir, schema, draw, save_media
        self.show = show
        self.records: list[dict[str, Any]] = []
        self._videos: dict[str, _VideoSink] = {}
        self.written: list[Path] = []

    def add(self, frame: Frame, poses: Poses, fps: float | None = None) -> None:
        for rec in poses.to_coco(image_id_of(frame)):
            rec["file"] = Path(frame.path).name
            self.records.append(rec)
        if not (self.save_media or self.show):
            return
        p = poses.to("cpu")
        if frame.frame is not None and self.save_media and not self.show:  # drawn in the video's thread
            self._video_sink(frame, fps or 30.0).put(lambda: self._draw(frame.image, p))
            return
        img = self._draw(frame.image, p)
        if self.show:
            cv2.imshow("kapao", img)
            cv2.waitKey(1)
        if not self.save_media:
            return
        if frame.frame is None:
            out = self.save_dir / Path(frame.path).name
            if not cv2.imwrite(str(out), img):
                raise DataError(f"cannot write {out}; check that the output folder is writable and has space")
            self.written.append(out)
        else:
            self._video_sink(frame, fps or 30.0).put(lambda: img)

    def _draw(self, image: np.ndarray, p: Poses) -> np.ndarray:
        return draw_poses(image, p.boxes, p.keypoints, self.schema, scores=p.scores, kp_objects=p.kp_objects,
                          line_width=self.draw.line_width, show_boxes=self.draw.show_boxes,
                          show_scores=self.draw.show_scores, show_kp_objects=self.draw.show_kp_objects,
                          kp_threshold=0.0 if self.draw.fused_only else None)

    def _video_sink(self, frame: Frame, fps: float) -> _VideoSink:
        key = frame.path
        if key not in self._videos:
            name = Path(key).stem if not key.isdigit() else f"webcam{key}"
            out = self.save_dir / f"{name}.mp4"
            h, w = frame.image.shape[:2]
            writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
            if not writer.isOpened():
                raise DataError(f"cannot write video {out}; check that the output folder is writable")
            self._videos[key] = _VideoSink(writer, out)
            self.written.append(out)
        return self._videos[key]

    def close(self) -> Path:
        sinks, self._videos = list(self._videos.values()), {}
        for sink in sinks:
            sink.release()
        if self.show:
            cv2.destroyAllWindows()
        path = self.save_dir / "predictions.json"
        try:
            with atomic_write(path, "w") as f:
                json.dump(self.records, f)
        except OSError as e:
            raise DataError(f"cannot write {path}: {e.strerror or e}; free disk space or use --project with a "
                            "writable folder") from None
        return path
