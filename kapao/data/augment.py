"""Image geometry and training augmentation for images with person instances (box + K keypoints).

Every function works in pixels of the image it is given and keeps the keypoint count K fixed:
a keypoint that leaves the image gets v = 0 (and x = y = 0) instead of being removed.
Randomness comes from a numpy Generator passed in, so data-loader workers can be seeded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from kapao.cfg.schema import PAD_VALUE
from kapao.cfg.settings import Hyp


# ----------------------------------------------------------------------------------------------
@dataclass
class Instances:
    """Person instances of one image, in pixels of that image.

    boxes:     (n, 4) float32 x1, y1, x2, y2
    keypoints: (n, K, 3) float32 x, y, v (v = 0: unlabelled or outside the image, then x = y = 0)
    keep:      (n,) bool; False once a pose object's box became too small. Its keypoints stay, so
               that its visible keypoints still become keypoint objects.
    """

    boxes: np.ndarray
    keypoints: np.ndarray
    keep: np.ndarray

    def __len__(self) -> int:
        return self.boxes.shape[0]

    @property
    def num_keypoints(self) -> int:
        return self.keypoints.shape[1]

    @classmethod
    def empty(cls, num_keypoints: int) -> "Instances":
        return cls(np.zeros((0, 4), np.float32), np.zeros((0, num_keypoints, 3), np.float32), np.zeros(0, bool))

    @classmethod
    def concat(cls, parts: Sequence["Instances"], num_keypoints: int) -> "Instances":
        if not parts:
            return cls.empty(num_keypoints)
        return cls(np.concatenate([p.boxes for p in parts]), np.concatenate([p.keypoints for p in parts]),
                   np.concatenate([p.keep for p in parts]))

    def copy(self) -> "Instances":
        return Instances(self.boxes.copy(), self.keypoints.copy(), self.keep.copy())

    def scaled(self, sx: float, sy: float, dx: float = 0.0, dy: float = 0.0) -> "Instances":
        """A copy with x -> x * sx + dx and y -> y * sy + dy (unlabelled keypoints stay at 0, 0)."""
        boxes = self.boxes * np.array([sx, sy, sx, sy], np.float32) + np.array([dx, dy, dx, dy], np.float32)
        kpts = self.keypoints.copy()
        vis = kpts[..., 2] > 0
        kpts[..., 0] = np.where(vis, kpts[..., 0] * sx + dx, 0)
        kpts[..., 1] = np.where(vis, kpts[..., 1] * sy + dy, 0)
        return Instances(boxes.astype(np.float32), kpts, self.keep.copy())

    def hide_outside(self, x1: float, y1: float, x2: float, y2: float) -> None:
        """In place: keypoints outside [x1, x2) x [y1, y2) get v = 0 and x = y = 0."""
        k = self.keypoints
        out = (k[..., 0] < x1) | (k[..., 0] >= x2) | (k[..., 1] < y1) | (k[..., 1] >= y2)
        k[out] = 0.0


# ----------------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------------
# Mosaic: hand-written, since albumentations' Mosaic cannot keep K keypoints per person with
# visibility set to 0 where a tile is cropped.
def mosaic4(tiles: Sequence[tuple[np.ndarray, Instances]], size: int,
            rng: np.random.Generator) -> tuple[np.ndarray, Instances]:
    """Place 4 images (long side ~`size`) around a random centre of a (2*size, 2*size) grey canvas.

    Returns the canvas (2s, 2s, 3) uint8 and the instances in canvas pixels: boxes clipped to their
    tile's visible part, keypoints outside it set to v = 0, and pose objects with less than 10% of
    their box left marked keep = False.
    """
    s = size
    canvas = np.full((2 * s, 2 * s, tiles[0][0].shape[2]), PAD_VALUE, np.uint8)
    xc, yc = (int(v) for v in rng.uniform(s / 2, 3 * s / 2, 2))
    parts = []
    for (img, inst), (left, top) in zip(tiles, ((True, True), (False, True), (True, False), (False, False))):
        h, w = img.shape[:2]
        ox, oy = (xc - w if left else xc), (yc - h if top else yc)  # tile origin on the canvas
        x1, y1, x2, y2 = max(ox, 0), max(oy, 0), min(ox + w, 2 * s), min(oy + h, 2 * s)
        if x2 <= x1 or y2 <= y1:
            continue
        canvas[y1:y2, x1:x2] = img[y1 - oy:y2 - oy, x1 - ox:x2 - ox]
        moved = inst.scaled(1.0, 1.0, ox, oy)
        full = moved.boxes.copy()
        moved.boxes[:, [0, 2]] = moved.boxes[:, [0, 2]].clip(x1, x2)
        moved.boxes[:, [1, 3]] = moved.boxes[:, [1, 3]].clip(y1, y2)
        moved.keep &= box_candidates(full, moved.boxes, wh_thr=0.0)
        moved.hide_outside(x1, y1, x2, y2)
        parts.append(moved)
    return canvas, Instances.concat(parts, tiles[0][1].num_keypoints)


# ----------------------------------------------------------------------------------------------
def box_candidates(before: np.ndarray, after: np.ndarray, wh_thr: float = 2.0, ar_thr: float = 20.0,
                   area_thr: float = 0.1, eps: float = 1e-16) -> np.ndarray:
    """(n,) bool: boxes (n, 4 xyxy) that keep > wh_thr px sides, > area_thr of `before`'s area and
    an aspect ratio < ar_thr after a transform (`before` already scaled to the new image)."""
    w1, h1 = before[:, 2] - before[:, 0], before[:, 3] - before[:, 1]
    w2, h2 = after[:, 2] - after[:, 0], after[:, 3] - after[:, 1]
    ar = np.maximum(w2 / (h2 + eps), h2 / (w2 + eps))
    return (w2 > wh_thr) & (h2 > wh_thr) & (w2 * h2 / (w1 * h1 + eps) > area_thr) & (ar < ar_thr)


def affine_matrix(in_hw: tuple[int, int], out_hw: tuple[int, int], rng: np.random.Generator, degrees: float = 0.0,
                  translate: float = 0.1, scale: float = 0.5, shear: float = 0.0,
                  perspective: float = 0.0) -> tuple[np.ndarray, float]:
    """A random 3x3 transform from input pixels to output pixels and its scale factor s.

    Centre the input, then perspective, rotation by U(-degrees, degrees) with scale s ~ U(1-scale,
    1+scale), shear (degrees), and a translation to (0.5 +- translate) x the output size.
    """
    centre = np.eye(3)
    centre[:2, 2] = -in_hw[1] / 2, -in_hw[0] / 2
    persp = np.eye(3)
    persp[2, :2] = rng.uniform(-perspective, perspective, 2)
    a = math.radians(rng.uniform(-degrees, degrees))
    s = float(rng.uniform(1 - scale, 1 + scale))
    rot = np.array([[s * math.cos(a), s * math.sin(a), 0], [-s * math.sin(a), s * math.cos(a), 0], [0, 0, 1]])
    sh = np.eye(3)
    sh[0, 1], sh[1, 0] = (math.tan(math.radians(v)) for v in rng.uniform(-shear, shear, 2))
    move = np.eye(3)
    move[:2, 2] = rng.uniform(0.5 - translate, 0.5 + translate, 2) * (out_hw[1], out_hw[0])
    return move @ sh @ rot @ persp @ centre, s


def _transform_points(m: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """(N, 2) points through a 3x3 matrix (with the perspective divide)."""
    p = np.concatenate([xy, np.ones((len(xy), 1))], 1) @ m.T
    return p[:, :2] / p[:, 2:3]


def warp(img: np.ndarray, inst: Instances, m: np.ndarray, out_hw: tuple[int, int],
         s: float = 1.0) -> tuple[np.ndarray, Instances]:
    """Warp an image and its instances by the 3x3 matrix `m` into an (h, w) = out_hw image.

    Boxes are rebuilt from their 4 transformed corners and clipped; pose objects failing
    `box_candidates` (vs. the old box x s) get keep = False; keypoints leaving the image get v = 0.
    """
    h, w = out_hw
    identity = (img.shape[0], img.shape[1]) == (h, w) and np.allclose(m, np.eye(3))
    if not identity:
        if m[2, 0] or m[2, 1]:
            img = cv2.warpPerspective(img, m, dsize=(w, h), borderValue=(PAD_VALUE,) * 3)
        else:
            img = cv2.warpAffine(img, m[:2], dsize=(w, h), borderValue=(PAD_VALUE,) * 3)
    n, k = len(inst), inst.num_keypoints
    if n == 0:
        return img, inst.copy()
    corners = inst.boxes[:, [0, 1, 2, 3, 0, 3, 2, 1]].reshape(-1, 2)  # x1y1, x2y2, x1y2, x2y1
    xy = _transform_points(m, corners.astype(np.float64)).reshape(n, 4, 2)
    boxes = np.concatenate([xy.min(1), xy.max(1)], 1)
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
    keep = inst.keep & box_candidates(inst.boxes * s, boxes)
    kpts = inst.keypoints.copy()
    kpts[..., :2] = _transform_points(m, kpts[..., :2].reshape(-1, 2).astype(np.float64)).reshape(n, k, 2)
    out = Instances(boxes.astype(np.float32), kpts.astype(np.float32), keep)
    out.keypoints[out.keypoints[..., 2] <= 0] = 0.0
    out.hide_outside(0, 0, w, h)
    return img, out


# Random affine: hand-written, since albumentations' Affine drops or keeps keypoints as a whole
# instead of keeping K per person with v = 0, and cannot rebuild person boxes from warped corners.
def random_affine(img: np.ndarray, inst: Instances, out_hw: tuple[int, int], hyp: Hyp,
                  rng: np.random.Generator) -> tuple[np.ndarray, Instances]:
    """Random rotation/scale/shear/perspective/translation (gains from `hyp`) into an out_hw image."""
    m, s = affine_matrix((img.shape[0], img.shape[1]), out_hw, rng, degrees=hyp.degrees, translate=hyp.translate,
                         scale=hyp.scale, shear=hyp.shear, perspective=hyp.perspective)
    return warp(img, inst, m, out_hw, s)


# ----------------------------------------------------------------------------------------------
# HSV: hand-written, since albumentations' HueSaturationValue adds shifts while YOLO multiplies
# each channel by a random gain in [1 - g, 1 + g].
def augment_hsv(img: np.ndarray, hgain: float, sgain: float, vgain: float, rng: np.random.Generator) -> np.ndarray:
    """In place on a BGR uint8 image: hue x U(1 +- hgain) (wrapping), saturation and value x U(1 +- gain)."""
    if not (hgain or sgain or vgain):
        return img
    r = rng.uniform(-1, 1, 3) * (hgain, sgain, vgain) + 1
    hue, sat, val = cv2.split(cv2.cvtColor(img, cv2.COLOR_BGR2HSV))
    x = np.arange(256, dtype=np.float64)
    lut_h = ((x * r[0]) % 180).astype(np.uint8)
    lut_s = np.clip(x * r[1], 0, 255).astype(np.uint8)
    lut_v = np.clip(x * r[2], 0, 255).astype(np.uint8)
    hsv = cv2.merge((cv2.LUT(hue, lut_h), cv2.LUT(sat, lut_s), cv2.LUT(val, lut_v)))
    cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR, dst=img)
    return img


def fliplr(img: np.ndarray, inst: Instances, flip_index: Sequence[int]) -> tuple[np.ndarray, Instances]:
    """Mirror left-right: x -> w - x, then keypoint k takes slot flip_index[k] (left <-> right)."""
    w = img.shape[1]
    img = cv2.flip(img, 1)  # much faster than a contiguous numpy copy of img[:, ::-1]
    boxes = inst.boxes.copy()
    boxes[:, [0, 2]] = w - inst.boxes[:, [2, 0]]
    kpts = inst.keypoints.copy()
    kpts[..., 0] = np.where(kpts[..., 2] > 0, w - kpts[..., 0], 0)
    kpts = kpts[:, list(flip_index)]  # flip_index is an involution: new[:, flip[k]] = old[:, k]
    return img, Instances(boxes, kpts, inst.keep.copy())


class PixelNoise:
    """Official KAPAO/YOLOv5 pixel-level extras: Blur p=0.1, MedianBlur p=0.1, ToGray p=0.01.

    albumentations does these correctly and fast; they do not move pixels, so labels are untouched.
    MedianBlur kernels stop at 5 (official: 7): OpenCV's 7x7 median is far slower (docs/DESIGN.md).
    """

    def __init__(self, seed: int = 0) -> None:
        import albumentations as A  # deferred: importing albumentations takes ~1 s

        self.transform = A.Compose([A.Blur(p=0.1), A.MedianBlur(blur_limit=(3, 5), p=0.1), A.ToGray(p=0.01)],
                                   seed=seed)

    def reseed(self, seed: int) -> None:
        self.transform.set_random_seed(seed)

    def __call__(self, img: np.ndarray) -> np.ndarray:
        return self.transform(image=img)["image"]
