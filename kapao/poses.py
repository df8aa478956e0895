"""The result type every consumer shares: the poses of one image (:class:`Poses`), with what a user
reaches for next: drawn (:meth:`Poses.plot`, :meth:`~Poses.save`, :meth:`~Poses.show`) or as a table
(:meth:`~Poses.to_df`, :meth:`~Poses.to_csv`)."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor

from kapao.cfg.schema import KeypointSchema
from kapao.draw import draw_poses
from kapao.errors import DataError, KapaoError
from kapao.runtime import atomic_write, optional_import

# A keypoint written to a YOLO label file (Poses.to_yolo, predict --save-txt) is labelled (v = 2) when its
# confidence reaches this: the default --conf-kp, the score a keypoint object needs to be fused.
VISIBLE_CONF = 0.5


@dataclass
class Poses:
    """Pose detections of one image, in original-image pixels. Every consumer shares this type.

    boxes:      (N, 4) person boxes x1, y1, x2, y2
    scores:     (N,) person score = objectness x person-class probability
    keypoints:  (N, K, 3) x, y, confidence of every keypoint (see :func:`postprocess`: a fused
                keypoint carries its keypoint object's score, any other keypoint the best
                keypoint-class evidence within the fusion tolerance, 0 when there is none)
    kp_objects: (M, 6) keypoint-object detections x1, y1, x2, y2, score, keypoint index (0..K-1),
                present when asked for
    fused:      (N, K) bool, True where the keypoint was fused from a keypoint object (the official
                rule's "confirmed" keypoints); all False when not given
    track_ids:  (N,) int64 track identities, or None when the poses are not tracked

    Filled by the predictor (None when the poses were built otherwise): ``orig_shape`` (h, w) of the
    image, ``path`` (the image, video or stream it came from), ``frame`` (index in a video; None for
    images), ``schema`` (the model's keypoint schema: names, skeleton) and ``image`` (the BGR image
    itself, kept by ``KAPAO.predict`` -- and ``run(keep_results=True)`` -- so :meth:`plot` needs no file).
    """

    boxes: Tensor
    scores: Tensor
    keypoints: Tensor
    kp_objects: Tensor | None = None
    fused: Tensor | None = None
    track_ids: Tensor | None = None
    orig_shape: tuple[int, int] | None = None
    path: str | None = None
    frame: int | None = None
    schema: KeypointSchema | None = field(default=None, repr=False, compare=False)
    image: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = self.boxes.shape[0]
        if self.boxes.shape != (n, 4) or self.scores.shape != (n,) or self.keypoints.ndim != 3 \
                or self.keypoints.shape[0] != n or self.keypoints.shape[2] != 3:
            raise ValueError(f"Poses: inconsistent shapes boxes {tuple(self.boxes.shape)}, scores "
                             f"{tuple(self.scores.shape)}, keypoints {tuple(self.keypoints.shape)}")
        if self.fused is None:
            self.fused = torch.zeros(self.keypoints.shape[:2], dtype=torch.bool, device=self.keypoints.device)
        elif self.fused.shape != self.keypoints.shape[:2] or self.fused.dtype != torch.bool:
            raise ValueError(f"Poses: fused must be a bool tensor of shape {tuple(self.keypoints.shape[:2])}, "
                             f"got {self.fused.dtype} {tuple(self.fused.shape)}")
        if self.track_ids is not None and self.track_ids.shape != (n,):
            raise ValueError(f"Poses: track_ids must be ({n},), got {tuple(self.track_ids.shape)}")

    def __len__(self) -> int:
        return self.boxes.shape[0]

    @property
    def num_keypoints(self) -> int:
        return self.keypoints.shape[1]

    @classmethod
    def empty(cls, num_keypoints: int, device: torch.device | str = "cpu") -> "Poses":
        z = torch.zeros
        return cls(z((0, 4), device=device), z((0,), device=device), z((0, num_keypoints, 3), device=device))

    def to(self, device: torch.device | str) -> "Poses":
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return replace(self, boxes=self.boxes.to(device), scores=self.scores.to(device),
                       keypoints=self.keypoints.to(device), kp_objects=move(self.kp_objects), fused=move(self.fused),
                       track_ids=move(self.track_ids))

    def to_coco(self, image_id: Any, category_id: int = 1) -> list[dict[str, Any]]:
        """COCO keypoint results: one dict per pose with keypoints [x, y, c]*K, score and bbox xywh."""
        boxes = self.boxes.detach().float().cpu()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
        kpts = self.keypoints.detach().float().cpu().reshape(len(self), 3 * self.num_keypoints).tolist()
        scores = self.scores.detach().float().cpu().tolist()
        return [
            {"image_id": image_id, "category_id": category_id,
             "keypoints": [round(v, 3) for v in k], "score": round(s, 5), "bbox": [round(v, 2) for v in b]}
            for k, s, b in zip(kpts, scores, xywh)
        ]

    def to_yolo(self, visible_conf: float = VISIBLE_CONF, class_id: int = 0, save_conf: bool = False) -> list[str]:
        """YOLO-pose label rows, one per pose: ``class cx cy w h`` then K x ``x y v``, all normalised to
        ``orig_shape`` (w, h), 6 decimals; the rows kapao's YOLO label reader and Ultralytics read as labels.

        v is 2 (labelled) for a keypoint whose confidence is at least `visible_conf`, else 0 with x = y = 0
        (the unlabelled placeholder). Box and keypoints are clipped into the image. ``save_conf`` appends
        the pose score as one more column (Ultralytics' ``save_conf``): such rows are predictions, not labels.
        """
        if self.orig_shape is None:
            raise KapaoError("Poses.to_yolo: these poses carry no orig_shape; set it (h, w) to normalise")
        h, w = self.orig_shape
        scale = torch.tensor([w, h, w, h], dtype=torch.float64)
        b = (self.boxes.detach().double().cpu() / scale).clamp(0, 1)
        kp = self.keypoints.detach().double().cpu()
        xy = (kp[..., :2] / scale[:2]).clamp(0, 1)
        visible = kp[..., 2] >= visible_conf
        xy[~visible] = 0.0
        rows = []
        for i in range(len(self)):
            cx, cy, bw, bh = (b[i, 0] + b[i, 2]) / 2, (b[i, 1] + b[i, 3]) / 2, b[i, 2] - b[i, 0], b[i, 3] - b[i, 1]
            text = f"{class_id} {cx:.6f} {cy:.6f} {bw:.6f} {bh:.6f}"
            text += "".join(f" {x:.6f} {y:.6f} {2 if v else 0}" for (x, y), v in zip(xy[i].tolist(), visible[i].tolist()))
            rows.append(text + (f" {float(self.scores[i]):.5f}" if save_conf else ""))
        return rows

    # ------------------------------------------------------------------------------------------
    # Drawn, saved, shown

    def plot(self, image: np.ndarray | None = None, *, boxes: bool = False, scores: bool = False,
             kp_objects: bool = False, line_width: int | None = None, fused_only: bool = False,
             track_ids: bool = True, schema: KeypointSchema | None = None) -> np.ndarray:
        """The poses drawn on a copy of `image` (H, W, 3 BGR uint8; default: the kept image, else the image
        file at ``path``), as ``kapao predict`` draws them: the keyword options are its ``--boxes``,
        ``--scores``, ``--kp-objects``, ``--line-width``, ``--fused-only`` and track-id labels."""
        schema = schema or self.schema
        if schema is None:
            raise KapaoError("Poses.plot: these poses carry no keypoint schema; pass schema= (e.g. model.schema)")
        img = self._source_image() if image is None else image
        return draw_poses(img, self.boxes, self.keypoints, schema, scores=self.scores, kp_objects=self.kp_objects,
                          line_width=line_width, show_boxes=boxes, show_scores=scores, show_kp_objects=kp_objects,
                          kp_threshold=None, keypoint_mask=self.fused if fused_only else None,
                          track_ids=self.track_ids, show_track_ids=track_ids)

    def _source_image(self) -> np.ndarray:
        if self.image is not None:
            return self.image
        if self.path and self.frame is None and Path(self.path).is_file():
            img = cv2.imread(self.path)
            if img is not None:
                return img
        where = f"frame {self.frame} of {self.path}" if self.frame is not None else (self.path or "an array")
        raise KapaoError(f"Poses.plot: the image of {where} was not kept; pass it: poses.plot(image)")

    def save(self, filename: str | os.PathLike, image: np.ndarray | None = None, **draw: Any) -> Path:
        """Write :meth:`plot` (same keywords) to `filename` (its suffix picks the format: .jpg, .png, …),
        atomically; returns the path."""
        out = Path(filename)
        ok, data = cv2.imencode(out.suffix or ".jpg", self.plot(image, **draw))
        if not ok:
            raise DataError(f"cannot encode {out}: use an image suffix such as .jpg or .png")
        try:
            with atomic_write(out) as f:
                f.write(data.tobytes())
        except OSError as e:
            raise DataError(f"cannot write {out}: {e.strerror or e}; choose a writable folder") from None
        return out

    def show(self, image: np.ndarray | None = None, title: str = "kapao", wait: int = 0, **draw: Any) -> None:
        """Show :meth:`plot` (same keywords) in a window until a key is pressed (`wait` ms; 0: forever)."""
        if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            raise KapaoError("Poses.show: no display found (DISPLAY is not set); use poses.save(file) instead")
        drawn = self.plot(image, **draw)
        try:
            cv2.imshow(title, drawn)
            cv2.waitKey(wait)
        except cv2.error:
            raise KapaoError("Poses.show: this OpenCV build has no GUI support (opencv-python-headless); "
                             "use poses.save(file) instead") from None

    # ------------------------------------------------------------------------------------------
    # As a table

    def table_columns(self) -> list[str]:
        """Columns of :meth:`to_df`: path, frame, pose, track_id, score, x1, y1, x2, y2, then per keypoint
        ``<name>_x``, ``<name>_y``, ``<name>_conf`` (names from the schema, else kp0, kp1, …)."""
        names = list(self.schema.names) if self.schema is not None else [f"kp{k}" for k in range(self.num_keypoints)]
        return ["path", "frame", "pose", "track_id", "score", "x1", "y1", "x2", "y2",
                *(f"{n}_{c}" for n in names for c in ("x", "y", "conf"))]

    def table_rows(self) -> list[list[Any]]:
        """One row per pose, as :meth:`table_columns` names them (original-image pixels; no pandas needed)."""
        boxes = self.boxes.detach().float().cpu().tolist()
        kpts = self.keypoints.detach().float().cpu().reshape(len(self), -1).tolist()
        scores = self.scores.detach().float().cpu().tolist()
        ids = [None] * len(self) if self.track_ids is None else [int(i) if i >= 0 else None for i in self.track_ids]
        return [[self.path, self.frame, i, ids[i], scores[i], *boxes[i], *kpts[i]] for i in range(len(self))]

    def to_df(self) -> Any:
        """A pandas DataFrame, one row per pose (columns: :meth:`table_columns`). Needs pandas (an extra)."""
        pd = optional_import("pandas", "Poses.to_df()")
        return pd.DataFrame(self.table_rows(), columns=self.table_columns())

    def to_csv(self, filename: str | os.PathLike | None = None) -> str:
        """:meth:`to_df` as CSV text, also written to `filename` (atomically) when given. Needs pandas."""
        text = self.to_df().to_csv(index=False)
        if filename is not None:
            with atomic_write(filename, "w", newline="") as f:
                f.write(text)
        return text
