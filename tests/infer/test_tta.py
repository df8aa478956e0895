"""Test-time augmentation: undoing flips and scales, merging the passes, the scaled and flipped forward passes."""
from __future__ import annotations

import pytest
import torch

from kapao.cfg.schema import HeadLayout
from kapao.infer.tta import TTA_FLIPS, TTA_SCALES, deaugment, merge_tta, tta_forward

FLIP = (0, 2, 1, 4, 3)  # K = 5: nose, left/right eye, left/right ear
LT = HeadLayout(len(FLIP))


def _network_view(pred, scale, flip, width):
    """How a network sees the image flipped (optional) then scaled: independent plain-loop code."""
    out = pred.clone()
    k = LT.num_keypoints
    kp0 = LT.kpt.start
    c0 = LT.cls.start + 1
    for j in range(k):
        src = FLIP[j] if flip else j  # keypoint j of the flipped image is keypoint FLIP[j] of the person
        x, y = pred[..., kp0 + 2 * src], pred[..., kp0 + 2 * src + 1]
        out[..., kp0 + 2 * j] = ((width - x) if flip else x) * scale
        out[..., kp0 + 2 * j + 1] = y * scale
        out[..., c0 + j] = pred[..., c0 + src]
    out[..., 0] = ((width - pred[..., 0]) if flip else pred[..., 0]) * scale
    out[..., 1:4] = pred[..., 1:4] * scale
    return out


def _random_pred(b=2, n=50, width=320.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    pred = torch.rand(b, n, LT.num_outputs, generator=g, dtype=torch.float64)
    pred[..., :4] *= width
    pred[..., LT.kpt] *= width
    return pred


@pytest.mark.parametrize("scale,flip", [(1.0, True), (0.8, False), (1.2, True), (0.5, True), (2.0, False)])
def test_deaugment_undoes_flip_and_scale(scale, flip):
    pred = _random_pred()
    seen = _network_view(pred, scale, flip, 320.0)
    assert not torch.allclose(seen, pred)
    back = deaugment(seen, scale, flip, 320.0, LT, FLIP)
    assert torch.allclose(back, pred, rtol=0, atol=1e-9)
    assert torch.equal(seen, _network_view(pred, scale, flip, 320.0))  # input not modified


def test_deaugment_flip_is_an_involution_and_swaps_left_right():
    pred = _random_pred(seed=1)
    once = deaugment(pred, 1.0, True, 320.0, LT, FLIP)
    assert torch.allclose(deaugment(once, 1.0, True, 320.0, LT, FLIP), pred, atol=1e-12)
    kp = LT.kpt.start
    assert torch.allclose(once[..., kp + 2], 320.0 - pred[..., kp + 4])  # left-eye x <- right-eye x
    assert torch.equal(once[..., LT.cls.start + 2], pred[..., LT.cls.start + 3])
    assert torch.equal(once[..., LT.cls.start], pred[..., LT.cls.start])  # person class stays
    assert torch.equal(once[..., LT.obj], pred[..., LT.obj])
    aniso = deaugment(pred, (0.5, 0.25), False, 320.0, LT, FLIP)
    assert torch.allclose(aniso[..., [0, 2]], pred[..., [0, 2]] * 2) and torch.allclose(aniso[..., [1, 3]], pred[..., [1, 3]] * 4)


def test_merge_tta_concatenates_deaugmented_passes():
    pred = _random_pred(n=20)
    views = [_network_view(pred, s, f, 320.0) for s, f in zip(TTA_SCALES, TTA_FLIPS)]
    merged = merge_tta(views, TTA_SCALES, TTA_FLIPS, 320.0, LT, FLIP)
    assert merged.shape == (2, 60, LT.num_outputs)
    for i in range(3):
        assert torch.allclose(merged[:, 20 * i: 20 * (i + 1)], pred, atol=1e-9)


def _blob_model(seen_shapes):
    """A stand-in network: one prediction per image, read off a bright rectangle in channel 0. Its
    'left eye' (keypoint 1) is the rectangle's left edge, 'right eye' (2) the right edge; its class
    scores for them are the mean of channel 1 over the left / right half of the rectangle."""
    def model_fn(x):
        seen_shapes.append(tuple(x.shape[-2:]))
        out = torch.zeros(x.shape[0], 1, LT.num_outputs, dtype=x.dtype)
        for i, img in enumerate(x):
            ys, xs = (img[0] > 0.5).nonzero(as_tuple=True)
            x1, x2, y1, y2 = xs.min().item(), xs.max().item() + 1, ys.min().item(), ys.max().item() + 1
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            row = out[i, 0]
            row[LT.box] = torch.tensor([cx, cy, x2 - x1, y2 - y1])
            row[LT.obj] = 1.0
            xm = (x1 + x2) // 2
            row[LT.cls.start + 2] = img[1, y1:y2, x1:xm].mean()
            row[LT.cls.start + 3] = img[1, y1:y2, xm:x2].mean()
            kps = torch.tensor([[cx, y1], [x1, cy], [x2, cy], [x1, y2], [x2, y2]], dtype=x.dtype)
            row[LT.kpt] = kps.flatten()
        return out
    return model_fn


def test_tta_forward_runs_scaled_flipped_passes_and_maps_them_back():
    img = torch.zeros(1, 3, 128, 192)
    img[0, 0, 40:80, 60:140] = 1.0  # rectangle x 60..140, y 40..80
    img[0, 1, 40:80, 60:100] = 0.9  # channel 1 bright on its left half only
    img[0, 1, 40:80, 100:140] = 0.1
    shapes = []
    out = tta_forward(_blob_model(shapes), img, TTA_SCALES, TTA_FLIPS, LT, FLIP, stride=64)
    assert shapes == [(128, 192), (128, 192), (192, 256)]  # 0.8: 102x153 padded to 128x192; 1.2: 153x230 -> 192x256
    assert out.shape == (1, 3, LT.num_outputs)
    expected = _blob_model([])(img)[0, 0]
    for p in range(3):
        assert torch.allclose(out[0, p, :4], expected[:4], atol=2.0)
        assert torch.allclose(out[0, p, LT.kpt], expected[LT.kpt], atol=2.0)
        # class scores of the left/right eye come back to the right side after the flip
        assert out[0, p, LT.cls.start + 2] > 0.8 and out[0, p, LT.cls.start + 3] < 0.2
    with pytest.raises(ValueError):
        tta_forward(_blob_model([]), img, (1.0, 0.5), (False,), LT, FLIP)


def test_tta_forward_pads_with_grey_and_empty_model_output():
    img = torch.zeros(2, 3, 64, 64)
    seen = []

    def model_fn(x):
        seen.append(x)
        return torch.zeros(x.shape[0], 0, LT.num_outputs), None  # a tuple: first item is used

    out = tta_forward(model_fn, img, (1.5,), (False,), LT, FLIP, stride=64)
    assert out.shape == (2, 0, LT.num_outputs)
    assert seen[0].shape[-2:] == (128, 128) and torch.allclose(seen[0][..., 100:, :], torch.tensor(0.447))
