"""Letterboxing: resize keeping the aspect ratio, then pad to the network's input shape.

Shared by inference (one image per call) and the training dataset; pixels in, pixels out.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

from kapao.cfg.schema import MAX_STRIDE, PAD_VALUE


def resize_long_side(img: np.ndarray, size: int, interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    """`img` scaled, aspect kept, so that its longer side is `size` pixels (each side at least 1);
    `img` itself when it already is."""
    h, w = img.shape[:2]
    r = size / max(h, w)
    if r == 1:
        return img
    return cv2.resize(img, (max(1, round(w * r)), max(1, round(h * r))), interpolation=interpolation)


def letterbox(img: np.ndarray, new_shape: int | tuple[int, int], auto: bool = False, stride: int = MAX_STRIDE,
              color: tuple[int, int, int] = (PAD_VALUE,) * 3, scaleup: bool = True,
              interpolation: int = cv2.INTER_LINEAR) -> tuple[np.ndarray, tuple[float, float], tuple[int, int]]:
    """Resize keeping the aspect ratio, then pad to `new_shape` (int or (h, w)).

    auto=True pads only up to the next multiple of `stride` (smallest rectangle); scaleup=False never
    enlarges. Returns (image, (rw, rh), (padw, padh)): a point maps as x_new = x * rw + padw,
    y_new = y * rh + padh (pixels; rw, rh are the exact ratios of the rounded resized size).
    """
    h0, w0 = img.shape[:2]
    th, tw = (new_shape, new_shape) if isinstance(new_shape, int) else (int(new_shape[0]), int(new_shape[1]))
    r = min(th / h0, tw / w0)
    if not scaleup:
        r = min(r, 1.0)
    nw, nh = max(1, round(w0 * r)), max(1, round(h0 * r))
    if auto:
        tw, th = math.ceil(nw / stride) * stride, math.ceil(nh / stride) * stride
    if (nw, nh) != (w0, h0):
        img = cv2.resize(img, (nw, nh), interpolation=interpolation)
    left, top = (tw - nw) // 2, (th - nh) // 2
    right, bottom = tw - nw - left, th - nh - top
    if left or top or right or bottom:
        img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=color)
    return img, (nw / w0, nh / h0), (left, top)
