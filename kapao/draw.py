"""Drawing poses, person boxes and keypoint objects on images with OpenCV only (no fonts to fetch)."""
from __future__ import annotations

import colorsys
import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from kapao.cfg.schema import KeypointSchema, TargetLayout
from kapao.errors import DataError

BOX_COLOR = (255, 128, 0)  # BGR, person boxes
TEXT_COLOR = (255, 255, 255)


@lru_cache(maxsize=64)
def palette(n: int, saturation: float = 0.85, value: float = 1.0) -> tuple[tuple[int, int, int], ...]:
    """n distinct BGR colours, hues evenly spaced."""
    rgb = (colorsys.hsv_to_rgb(i / max(n, 1), saturation, value) for i in range(n))
    return tuple((int(b * 255), int(g * 255), int(r * 255)) for r, g, b in rgb)


def track_color(track_id: int) -> tuple[int, int, int]:
    """A BGR colour of its own for a track id, the same in every frame (hues spread by the golden ratio)."""
    r, g, b = colorsys.hsv_to_rgb((track_id * 0.618033988749895) % 1.0, 0.85, 1.0)
    return int(b * 255), int(g * 255), int(r * 255)


def _as_numpy(x: Any, cols: int | None = None) -> np.ndarray:
    a = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float32)
    return a.reshape(-1, cols) if cols is not None else a


def _point(x: float, y: float) -> tuple[int, int]:
    return int(round(x)), int(round(y))


def draw_poses(img_bgr: np.ndarray, boxes: Any, keypoints: Any, schema: KeypointSchema, scores: Any = None,
               kp_objects: Any = None, line_width: int | None = None, show_boxes: bool = True,
               show_scores: bool = True, show_kp_objects: bool = False,
               kp_threshold: float | None = 0.0, keypoint_mask: Any = None, track_ids: Any = None,
               show_track_ids: bool = True) -> np.ndarray:
    """A copy of `img_bgr` (H, W, 3 uint8) with poses drawn; all coordinates in its pixels.

    boxes (N, 4) x1, y1, x2, y2; keypoints (N, K, 3) x, y, conf: a keypoint is drawn when its conf
    > kp_threshold (0: skips v = 0 labels; None: draws every keypoint) and, when `keypoint_mask`
    (N, K) bool is given, where it is True (e.g. Poses.fused: only keypoints confirmed by a keypoint
    object); scores (N,); kp_objects (M, 6) x1, y1, x2, y2, score, keypoint index. One colour per
    skeleton limb, one per keypoint type. Tensors or arrays. With `track_ids` (N,) (Poses.track_ids;
    negative = untracked), a tracked pose's box and limbs take its track's colour and, with
    `show_track_ids`, its id is written above the box.
    """
    img = np.ascontiguousarray(img_bgr).copy()
    lw = line_width or max(round(sum(img.shape[:2]) / 2 * 0.003), 2)
    boxes = _as_numpy(boxes, 4)
    k = schema.num_keypoints
    kpts = _as_numpy(keypoints).reshape(len(boxes), k, 3) if len(boxes) else np.zeros((0, k, 3), np.float32)
    scores = None if scores is None else _as_numpy(scores).reshape(-1)
    mask = None if keypoint_mask is None else _as_numpy(keypoint_mask).reshape(len(boxes), k) > 0
    if show_kp_objects and kp_objects is not None:
        _draw_kp_objects(img, _as_numpy(kp_objects, 6), k, max(1, lw // 2))
    ids = None if track_ids is None else torch.as_tensor(track_ids).cpu().numpy().astype(np.int64).reshape(-1)
    for i, box in enumerate(boxes):
        color = track_color(int(ids[i])) if ids is not None and ids[i] >= 0 else None
        if show_boxes:
            cv2.rectangle(img, _point(box[0], box[1]), _point(box[2], box[3]), color or BOX_COLOR, lw, cv2.LINE_AA)
        text = " ".join(([f"id {ids[i]}"] if color and show_track_ids and ids is not None else [])
                        + ([f"{scores[i]:.2f}"] if show_boxes and show_scores and scores is not None else []))
        if text:
            _label(img, text, _point(box[0], box[1]), lw, color or BOX_COLOR)
        _draw_skeleton(img, kpts[i], schema, lw, kp_threshold, None if mask is None else mask[i], color)
    return img


def _draw_skeleton(img: np.ndarray, kpts: np.ndarray, schema: KeypointSchema, lw: int,
                   kp_threshold: float | None, mask: np.ndarray | None = None,
                   limb_color: tuple[int, int, int] | None = None) -> None:
    """Limbs (both ends drawn; one colour per limb, or `limb_color` for all) then keypoint dots, in place;
    kpts (K, 3) pixels + conf; mask (K,) bool."""
    ok = np.isfinite(kpts[:, :2]).all(1)
    if kp_threshold is not None:
        ok &= kpts[:, 2] > kp_threshold
    if mask is not None:
        ok &= mask
    for (a, b), color in zip(schema.skeleton, palette(len(schema.skeleton))):
        color = limb_color or color
        if ok[a] and ok[b]:
            cv2.line(img, _point(*kpts[a, :2]), _point(*kpts[b, :2]), color, lw, cv2.LINE_AA)
    for j, color in enumerate(palette(schema.num_keypoints)):
        if ok[j]:
            cv2.circle(img, _point(*kpts[j, :2]), lw + 1, color, -1, cv2.LINE_AA)


def _draw_kp_objects(img: np.ndarray, objs: np.ndarray, k: int, lw: int) -> None:
    """Keypoint-object boxes (M, 6) in the colour of their keypoint type, in place."""
    colors = palette(k)
    for x1, y1, x2, y2, _, idx in objs:
        if 0 <= int(idx) < k:
            cv2.rectangle(img, _point(x1, y1), _point(x2, y2), colors[int(idx)], lw, cv2.LINE_AA)


def _label(img: np.ndarray, text: str, corner: tuple[int, int], lw: int,
           background: tuple[int, int, int] = BOX_COLOR) -> None:
    """Text on a filled box above `corner`."""
    scale = max(lw / 3, 0.4)
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, max(lw - 1, 1))
    x, y = corner
    y = max(y, th + base)
    cv2.rectangle(img, (x, y - th - base), (x + tw, y), background, -1)
    cv2.putText(img, text, (x, y - base), cv2.FONT_HERSHEY_SIMPLEX, scale, TEXT_COLOR, max(lw - 1, 1), cv2.LINE_AA)


# ----------------------------------------------------------------------------------------------
def targets_to_drawables(targets: np.ndarray, hw: tuple[int, int], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TargetLayout rows of one image -> (boxes (N, 4), keypoints (N, K, 3), kp_objects (M, 6)) in pixels."""
    h, w = hw
    layout = TargetLayout(k)
    scale = np.array([w, h, w, h], np.float32)

    def xyxy(rows: np.ndarray) -> np.ndarray:
        c = rows[:, layout.box] * scale
        return np.concatenate([c[:, :2] - c[:, 2:] / 2, c[:, :2] + c[:, 2:] / 2], 1)

    poses = targets[targets[:, layout.cls] == 0]
    kpts = poses[:, layout.kpt].reshape(-1, k, 3) * np.array([w, h, 1], np.float32)
    objs = targets[targets[:, layout.cls] > 0]
    kp_objects = np.concatenate([xyxy(objs), np.ones((len(objs), 1)), objs[:, [layout.cls]] - 1], 1)
    return xyxy(poses), kpts, kp_objects


def render_batch(images: Any, targets: Any, schema: KeypointSchema, path: str | os.PathLike,
                 max_images: int = 16, max_size: int = 1920) -> Path:
    """Write a JPEG grid of a collated batch with skeletons, person boxes and keypoint-object boxes.

    images (B, 3, H, W) uint8 RGB; targets (M, 6 + 3K) in TargetLayout (normalised, column 0 = image
    index). The grid is at most `max_size` pixels wide. Returns the path written.
    """
    imgs = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    tg = _as_numpy(targets, TargetLayout(schema.num_keypoints).width)
    n = min(len(imgs), max_images)
    _, _, h, w = imgs.shape
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    r = min(1.0, max_size / (cols * max(h, w)))
    th, tw = max(1, round(h * r)), max(1, round(w * r))
    grid = np.full((rows * th, cols * tw, 3), 255, np.uint8)
    for i in range(n):
        tile = cv2.resize(np.ascontiguousarray(imgs[i].transpose(1, 2, 0)[..., ::-1]), (tw, th))
        boxes, kpts, objs = targets_to_drawables(tg[tg[:, TargetLayout.image] == i], (th, tw), schema.num_keypoints)
        tile = draw_poses(tile, boxes, kpts, schema, kp_objects=objs, line_width=max(1, round(2 * r)),
                          show_scores=False, show_kp_objects=True)
        y, x = (i // cols) * th, (i % cols) * tw
        grid[y:y + th, x:x + tw] = tile
        cv2.rectangle(grid, (x, y), (x + tw - 1, y + th - 1), (255, 255, 255), 2)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), grid, [cv2.IMWRITE_JPEG_QUALITY, 90]):
        raise DataError(f"cannot write {out}; check that the folder is writable and the name ends in .jpg")
    return out
