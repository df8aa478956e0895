"""`--save-csv`: the keypoints of every pose as one CSV table, written frame by frame (a sink of the run)."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Sequence

from kapao.data.sources import Frame
from kapao.errors import DataError
from kapao.infer.resume import cut_unfinished_line
from kapao.poses import Poses

KEYPOINTS_CSV = "keypoints.csv"


class CsvSink:
    """One row per keypoint of every pose in ``save_dir/keypoints.csv``.

    Columns: source (file name), frame (index in the video; empty for images), pose (index in the
    frame), track (track id; empty when not tracked or in no confirmed track), keypoint (name), x, y
    (original-image pixels), confidence. Each frame's rows go out in one write followed by a flush, so a
    crash or kill leaves a readable CSV of every frame done; a resumed run appends, after cutting an
    unfinished last line. Filter by `track` to follow one person. A :class:`kapao.infer.sinks.Sink`.
    """

    COLUMNS = ("source", "frame", "pose", "track", "keypoint", "x", "y", "confidence")

    def __init__(self, keypoint_names: Sequence[str]) -> None:
        self.names = list(keypoint_names)
        self.path: Path | None = None
        self._file: io.TextIOWrapper | None = None

    def open(self, save_dir: Path | None) -> None:
        if save_dir is None:
            raise ValueError("CsvSink needs a run folder")
        self.path = Path(save_dir) / KEYPOINTS_CSV
        try:
            if self.path.exists():
                cut_unfinished_line(self.path)
            fresh = not self.path.exists() or self.path.stat().st_size == 0
            self._file = open(self.path, "a", newline="", encoding="utf-8")  # closed in close()
        except OSError as e:
            raise DataError(f"cannot write {self.path}: {e.strerror or e}; use --project with a writable folder") from None
        if fresh:
            self._write([self.COLUMNS])

    def add(self, frame: Frame, poses: Poses) -> None:
        """Rows of one frame or image (its poses in original-image pixels)."""
        kp = poses.keypoints.detach().float().cpu().numpy()
        ids = None if poses.track_ids is None else poses.track_ids.cpu().tolist()
        name, index = Path(frame.path).name, frame.frame
        rows = []
        for i in range(len(poses)):
            track = "" if ids is None or ids[i] < 0 else ids[i]
            rows += [(name, "" if index is None else index, i, track, self.names[k],
                      f"{kp[i, k, 0]:.2f}", f"{kp[i, k, 1]:.2f}", f"{kp[i, k, 2]:.4f}") for k in range(kp.shape[1])]
        self._write(rows)

    def _write(self, rows: Sequence[Sequence[Any]]) -> None:
        buf = io.StringIO()
        csv.writer(buf).writerows(rows)
        assert self._file is not None, "CsvSink.open() comes first"
        try:
            self._file.write(buf.getvalue())
            self._file.flush()
        except OSError as e:
            raise DataError(f"cannot write {self.path}: {e.strerror or e}; free disk space") from None

    def close(self) -> None:
        if self._file is not None:
            f, self._file = self._file, None
            f.close()
