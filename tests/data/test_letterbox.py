"""Letterboxing and long-side resizing: output shapes, padding, the ratio/pad that map points back."""
from __future__ import annotations

import numpy as np
import pytest

from kapao.data.letterbox import letterbox, resize_long_side
from tests.data.test_augment import coord_image


@pytest.mark.parametrize("shape,size,expect", [((425, 640), 320, (212, 320)), ((640, 425), 1280, (1280, 850)),
                                               ((3, 2000), 64, (1, 64))])
def test_resize_long_side(shape, size, expect):
    img = coord_image(*shape) if max(shape) <= 256 else np.zeros((*shape, 3), np.uint8)
    assert resize_long_side(img, size).shape[:2] == expect
    assert resize_long_side(img, max(shape)) is img  # already that size: no copy


@pytest.mark.parametrize("shape,new,auto,expect", [
    ((425, 640), 640, False, (640, 640)),
    ((425, 640), (320, 480), False, (320, 480)),
    ((425, 640), 640, True, (448, 640)),
    ((1080, 1920), 1280, True, (768, 1280)),
    ((100, 50), 256, False, (256, 256)),
])
def test_letterbox_shapes_and_inverse(shape, new, auto, expect):
    h0, w0 = shape
    img = np.random.default_rng(0).integers(0, 255, (h0, w0, 3), dtype=np.uint8)
    out, (rw, rh), (pw, ph) = letterbox(img, new, auto=auto)
    assert out.shape[:2] == expect
    assert out.shape[0] % 64 == 0 or not auto
    nh, nw = round(h0 * rh), round(w0 * rw)
    assert abs(rw - rh) < 0.01 and (nh == out.shape[0] - 2 * ph or nh == out.shape[0] - 2 * ph - 1)
    # the resized image occupies exactly [pw, pw + nw) x [ph, ph + nh); the rest is pad grey
    assert (out[:ph] == 114).all() and (out[ph + nh:] == 114).all()
    assert (out[:, :pw] == 114).all() and (out[:, pw + nw:] == 114).all()
    # and the image reaches those edges (random pixels: no full row/column of 114)
    for row in (out[ph], out[ph + nh - 1]):
        assert not (row[pw:pw + nw] == 114).all()
    for col in (out[:, pw], out[:, pw + nw - 1]):
        assert not (col[ph:ph + nh] == 114).all()


def test_letterbox_maps_content_back():
    img = coord_image(200, 240)
    out, (rw, rh), (pw, ph) = letterbox(img, 320)
    for x0, y0 in [(10.5, 20.5), (120.5, 100.5), (230.5, 190.5)]:
        x, y = x0 * rw + pw, y0 * rh + ph
        b, g, r = out[int(y), int(x)].astype(float)
        assert abs(r + 0.5 - x0) < 1.5 and abs(g + 0.5 - y0) < 1.5


def test_letterbox_no_scaleup_and_gray():
    img = np.zeros((50, 80), np.uint8)
    out, ratio, pad = letterbox(img, 320, scaleup=False)
    assert out.shape == (320, 320) and ratio == (1.0, 1.0) and pad == (120, 135)
    same, ratio, pad = letterbox(np.zeros((64, 128, 3), np.uint8), (64, 128))
    assert same.shape == (64, 128, 3) and ratio == (1.0, 1.0) and pad == (0, 0)
