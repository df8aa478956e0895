"""Outputs people build datasets from: ``--save-txt`` (YOLO-pose label files of the predictions, to
correct in an annotation tool and train on) and ``--save-crop`` (one image per person box). Both are
:class:`kapao.infer.sinks.Sink` objects fed every frame of a predict run.

Layout in the run folder (as Ultralytics lays it out): ``labels/<name>.txt`` for an image
(``<name>`` its path relative to the SOURCE folder, suffix dropped) and ``labels/<video stem>_<frame>.txt``
for a video frame; ``crops/person/<name>_<pose index>.jpg``. An image without poses gets an empty label
file (a negative). Rows as :meth:`kapao.poses.Poses.to_yolo` writes them.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np

from kapao.data.sources import Frame
from kapao.errors import DataError
from kapao.infer.records import source_name
from kapao.poses import VISIBLE_CONF, Poses
from kapao.runtime import atomic_write

LABELS_DIR = "labels"
CROPS_DIR = "crops/person"


def _stem(frame: Frame, root: Path | None) -> str:
    """``<name>`` of a frame's output files: its source path relative to `root` without suffix, plus
    ``_<frame>`` for a video frame."""
    name = Path(source_name(frame.path, root)).with_suffix("").as_posix()
    if ".." in Path(name).parts or Path(name).is_absolute():  # a stream or a file outside the root
        name = Path(frame.path).stem or "stream"
    return name if frame.frame is None else f"{name}_{frame.frame}"


class LabelSink:
    """``--save-txt``: one YOLO-pose label file per image/frame; ``save_conf`` appends the pose score to
    each row; a keypoint is labelled when its confidence reaches ``visible_conf``."""

    def __init__(self, root: Path | None = None, save_conf: bool = False, visible_conf: float = VISIBLE_CONF) -> None:
        self.root, self.save_conf, self.visible_conf = root, save_conf, visible_conf
        self.folder = Path(LABELS_DIR)  # under the run folder once opened
        self.written = 0

    def open(self, save_dir: Path | None) -> None:
        if save_dir is None:
            raise ValueError("LabelSink needs a run folder")
        self.folder = Path(save_dir) / LABELS_DIR

    def add(self, frame: Frame, poses: Poses) -> None:
        if poses.orig_shape is None:
            poses = dataclasses.replace(poses, orig_shape=frame.image.shape[:2])
        rows = poses.to_yolo(self.visible_conf, save_conf=self.save_conf)
        out = self.folder / f"{_stem(frame, self.root)}.txt"
        try:
            with atomic_write(out, "w") as f:
                f.write("".join(r + "\n" for r in rows))
        except OSError as e:
            raise DataError(f"cannot write {out}: {e.strerror or e}; free disk space or use another --project") from None
        self.written += 1

    def close(self) -> None:
        pass


class CropSink:
    """``--save-crop``: every person box cut out of the original image (clipped to it) as a JPEG."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root
        self.folder = Path(CROPS_DIR)  # under the run folder once opened
        self.written = 0

    def open(self, save_dir: Path | None) -> None:
        if save_dir is None:
            raise ValueError("CropSink needs a run folder")
        self.folder = Path(save_dir) / CROPS_DIR

    def add(self, frame: Frame, poses: Poses) -> None:
        h, w = frame.image.shape[:2]
        boxes = poses.boxes.detach().float().cpu().numpy()
        for i, (x1, y1, x2, y2) in enumerate(boxes):
            c = np.array([np.floor(x1), np.floor(y1), np.ceil(x2), np.ceil(y2)]).clip(0, [w, h, w, h]).astype(int)
            if c[2] <= c[0] or c[3] <= c[1]:
                continue  # a box outside the image, or of no area
            out = self.folder / f"{_stem(frame, self.root)}_{i}.jpg"
            ok, data = cv2.imencode(".jpg", frame.image[c[1]:c[3], c[0]:c[2]])
            try:
                if not ok:
                    raise OSError("JPEG encoding failed")
                with atomic_write(out) as f:
                    f.write(data.tobytes())
            except OSError as e:
                raise DataError(f"cannot write {out}: {e.strerror or e}; free disk space or use another --project") from None
            self.written += 1

    def close(self) -> None:
        pass
