"""The result type every consumer shares: the poses of one image (:class:`Poses`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


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
    """

    boxes: Tensor
    scores: Tensor
    keypoints: Tensor
    kp_objects: Tensor | None = None
    fused: Tensor | None = None
    track_ids: Tensor | None = None

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

        return Poses(self.boxes.to(device), self.scores.to(device), self.keypoints.to(device),
                     move(self.kp_objects), move(self.fused), move(self.track_ids))

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
