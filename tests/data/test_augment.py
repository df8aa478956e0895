"""Augmentation primitives on hand-built arrays: affine warp, mosaic, flip, HSV, pixel noise."""
from __future__ import annotations

import numpy as np

from kapao.cfg.settings import Hyp
from kapao.data.augment import (
    Instances,
    PixelNoise,
    affine_matrix,
    augment_hsv,
    box_candidates,
    fliplr,
    mosaic4,
    random_affine,
    warp,
)


def coord_image(h: int, w: int, tag: int = 0) -> np.ndarray:
    """BGR image whose pixel (x, y) is (B, G, R) = (tag, y, x); h, w <= 256."""
    img = np.empty((h, w, 3), np.uint8)
    img[..., 0] = tag
    img[..., 1] = np.arange(h)[:, None]
    img[..., 2] = np.arange(w)[None, :]
    return img


def one_person(k: int = 4) -> Instances:
    kpts = np.array([[[20, 30, 2], [60, 40, 1], [0, 0, 0], [90, 100, 2]]], np.float32)[:, :k]
    return Instances(np.array([[10, 20, 100, 110]], np.float32), kpts, np.ones(1, bool))


# ----------------------------------------------------------------------------------------------
def test_warp_identity_keeps_everything():
    img, inst = coord_image(120, 130), one_person()
    out, new = warp(img, inst, np.eye(3), (120, 130))
    assert np.array_equal(out, img)
    np.testing.assert_array_equal(new.boxes, inst.boxes)
    np.testing.assert_array_equal(new.keypoints, inst.keypoints)


def test_warp_rotation_rebuilds_box_from_corners():
    # 90 degrees about the origin then shift right by h: (x, y) -> (h - y, x)
    h, w = 120, 130
    m = np.array([[0, -1, h], [1, 0, 0], [0, 0, 1]], float)
    img, inst = coord_image(h, w), one_person()
    out, new = warp(img, inst, m, (w, h))
    np.testing.assert_allclose(new.boxes[0], [h - 110, 10, h - 20, 100])
    np.testing.assert_allclose(new.keypoints[0, 0], [h - 30, 20, 2])
    assert new.keypoints[0, 2].tolist() == [0, 0, 0]  # unlabelled stays unlabelled at 0, 0
    x, y = new.keypoints[0, 3, :2]
    b, g, r = out[int(y), int(x)].astype(float)
    assert abs(r - 90) <= 1.5 and abs(g - 100) <= 1.5  # the content moved with it


def test_warp_pushes_keypoints_out():
    img, inst = coord_image(120, 130), one_person()
    m = np.eye(3)
    m[0, 2] = 70  # shift right: keypoints at x >= 60 leave a 130-wide image
    out, new = warp(img, inst, m, (120, 130))
    assert new.keypoints[0, :, 2].tolist() == [2, 0, 0, 0]
    assert (new.keypoints[0, 1:] == 0).all()
    assert new.keep[0]  # the box is clipped to x 80..130, still 55% of its area
    m[0, 2] = 125
    _, gone = warp(img, inst, m, (120, 130))
    assert not gone.keep[0] and (gone.keypoints[..., 2] == 0).all()
    assert (inst.keypoints[0, :, 2] == [2, 1, 0, 2]).all()  # input not mutated


def test_box_candidates():
    before = np.array([[0, 0, 100, 100]] * 4, float)
    after = np.array([[0, 0, 50, 50], [0, 0, 2, 50], [0, 0, 20, 20], [0, 0, 100, 4]], float)
    assert box_candidates(before, after).tolist() == [True, False, False, False]


def test_affine_matrix_scale_range_and_centre():
    rng = np.random.default_rng(0)
    for _ in range(50):
        m, s = affine_matrix((400, 600), (200, 300), rng, scale=0.9, translate=0.0)
        assert 0.1 <= s <= 1.9
        centre = m @ np.array([300, 200, 1.0])
        np.testing.assert_allclose(centre[:2], [150, 100])  # no translation: input centre -> output centre
        np.testing.assert_allclose(np.linalg.det(m[:2, :2]), s * s)


def test_random_affine_defaults_are_pure_scale_translate():
    rng = np.random.default_rng(1)
    img, inst = coord_image(128, 128), one_person()
    out, new = random_affine(img, inst, (128, 128), Hyp(), rng)
    assert out.shape == (128, 128, 3)
    vis = new.keypoints[0, :, 2] > 0
    assert vis.any()
    for x, y, _ in new.keypoints[0][vis]:  # each visible keypoint still on its own content
        b, g, r = out[int(y), int(x)].astype(float)
        d = np.hypot(inst.keypoints[0, :, 0] - r, inst.keypoints[0, :, 1] - g)
        assert d.min() < 12


# ----------------------------------------------------------------------------------------------
def test_mosaic4_places_tiles_and_hides_cropped_keypoints():
    rng = np.random.default_rng(3)
    tiles = [(coord_image(120, 130, tag), one_person()) for tag in (40, 80, 160, 200)]
    canvas, inst = mosaic4(tiles, 128, rng)
    assert canvas.shape == (256, 256, 3) and len(inst) == 4
    visible = inst.keypoints[..., 2] > 0
    assert 0 < visible.sum() < 4 * 3  # some tile is cropped by the canvas border
    for p in range(4):
        for x, y, v in inst.keypoints[p]:
            if v > 0:
                b, g, r = canvas[int(y), int(x)]
                assert b == (40, 80, 160, 200)[p]  # on its own tile
                src = tiles[p][1].keypoints[0]
                assert np.hypot(src[:, 0] - r, src[:, 1] - g).min() <= 1.0
    assert (inst.boxes[:, [0, 2]] <= 256).all() and (inst.boxes >= 0).all()


def test_mosaic4_with_empty_tiles():
    tiles = [(coord_image(60, 70), Instances.empty(5)) for _ in range(4)]
    canvas, inst = mosaic4(tiles, 64, np.random.default_rng(0))
    assert canvas.shape == (128, 128, 3) and len(inst) == 0 and inst.keypoints.shape == (0, 5, 3)


# ----------------------------------------------------------------------------------------------
def test_fliplr_swaps_and_is_an_involution():
    img, inst = coord_image(120, 130), one_person()
    flip = (0, 3, 2, 1)  # 1 <-> 3
    out, new = fliplr(img, inst, flip)
    assert np.array_equal(out, img[:, ::-1])
    np.testing.assert_allclose(new.boxes[0], [30, 20, 120, 110])
    np.testing.assert_allclose(new.keypoints[0, 3], [130 - 60, 40, 1])  # old keypoint 1 now in slot 3
    np.testing.assert_allclose(new.keypoints[0, 1], [130 - 90, 100, 2])
    assert new.keypoints[0, 2].tolist() == [0, 0, 0]
    back_img, back = fliplr(out, new, flip)
    assert np.array_equal(back_img, img)
    np.testing.assert_allclose(back.keypoints, inst.keypoints)


def test_augment_hsv_gains():
    rng = np.random.default_rng(0)
    img = np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    same = img.copy()
    augment_hsv(same, 0, 0, 0, rng)
    assert np.array_equal(same, img)
    gray = np.full((8, 8, 3), 100, np.uint8)
    dark = gray.copy()
    augment_hsv(dark, 0.0, 0.0, 0.4, np.random.default_rng(5))
    v = dark[0, 0, 0]
    assert (dark == v).all() and 60 <= v <= 140 and v != 100  # value x U[0.6, 1.4], still gray
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 2] = 200
    out = red.copy()
    augment_hsv(out, 0.0, 0.7, 0.0, np.random.default_rng(7))
    assert out[0, 0, 2] == 200 and out[0, 0, 0] == out[0, 0, 1]  # saturation changes, value and hue do not


def test_pixel_noise_keeps_shape_and_is_seedable():
    img = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    a, b = PixelNoise(seed=3), PixelNoise(seed=3)
    outs_a = [a(img) for _ in range(20)]
    outs_b = [b(img) for _ in range(20)]
    assert all(o.shape == img.shape and o.dtype == np.uint8 for o in outs_a)
    assert all(np.array_equal(x, y) for x, y in zip(outs_a, outs_b))
    assert any(not np.array_equal(o, img) for o in outs_a)  # p = 0.1 blur: some of 20 changed
