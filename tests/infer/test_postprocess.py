"""Post-processing: NMS, mapping to original pixels, keypoint-object fusion, TTA output, result type."""
from __future__ import annotations

import math
import random

import pytest
import torch

from kapao.cfg.schema import HeadLayout
from kapao.cfg.settings import PREDICT_SETTINGS, VAL_SETTINGS
from kapao.infer.nms import nms
from kapao.infer.postprocess import (
    KP_EVIDENCE_FLOOR,
    fuse_keypoints,
    keypoint_confidence,
    keypoint_evidence,
    postprocess,
    scale_to_original,
)
from kapao.infer.tta import TTA_FLIPS, TTA_SCALES, merge_tta
from tests.infer.test_tta import FLIP, LT, _network_view, _random_pred

# ----------------------------------------------------------------------------------------------
# Sequential reference of the official fusion rule (val.py post_process_batch), in plain Python.

def fuse_keypoints_reference(scores, keypoints_xy, kp_objects, conf_kp_person, tolerance):
    """Keypoint objects in descending score (ties: input order), one at a time, against the
    keypoints as updated so far; only poses with score > conf_kp_person take part."""
    poses = [[[x, y, 0.0] for x, y in pose] for pose in keypoints_xy.tolist()]
    threshold = torch.tensor(conf_kp_person, dtype=scores.dtype).item()  # compared in the scores' precision
    taking_part = [i for i, s in enumerate(scores.tolist()) if s > threshold]
    objects = sorted(kp_objects.tolist(), key=lambda o: -o[4])  # Python's sort is stable
    tol2 = tolerance * tolerance
    for x1, y1, x2, y2, score, kp in objects:
        if not taking_part:
            break
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        best, best_d = None, None
        for i in taking_part:  # argmin, first pose on a tie
            px, py, _ = poses[i][int(kp)]
            dx, dy = cx - px, cy - py
            d = dx * dx + dy * dy
            if best_d is None or d < best_d:
                best, best_d = i, d
        if score > poses[best][int(kp)][2] and best_d < tol2:
            poses[best][int(kp)] = [cx, cy, score]
    return torch.tensor(poses, dtype=torch.float64).reshape(len(poses), keypoints_xy.shape[1], 3)


def fuse_one_round(scores, keypoints_xy, kp_objects, conf_kp_person, tolerance):
    """A WRONG shortcut (every object matched against the regressed keypoints only), used to prove
    that the random cases exercise the sequential dependencies."""
    regressed = [[[x, y] for x, y in pose] for pose in keypoints_xy.tolist()]
    poses = [[[x, y, 0.0] for x, y in pose] for pose in regressed]
    threshold = torch.tensor(conf_kp_person, dtype=scores.dtype).item()
    taking_part = [i for i, s in enumerate(scores.tolist()) if s > threshold]
    for x1, y1, x2, y2, score, kp in sorted(kp_objects.tolist(), key=lambda o: -o[4]):
        if not taking_part:
            break
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        d, i = min(((cx - regressed[i][int(kp)][0]) ** 2 + (cy - regressed[i][int(kp)][1]) ** 2, i) for i in taking_part)
        if score > poses[i][int(kp)][2] and d < tolerance * tolerance:
            poses[i][int(kp)] = [cx, cy, score]
    return torch.tensor(poses, dtype=torch.float64).reshape(len(poses), keypoints_xy.shape[1], 3)


def _settings(conf_kp_person=0.3, tolerance=50.0):
    return VAL_SETTINGS.replace(conf_kp_person=conf_kp_person, tolerance=tolerance)


def _random_case(rng: random.Random, dtype=torch.float64):
    """Poses and keypoint objects on a coarse integer grid: many ties in distance and score, many
    keypoint objects competing for the same keypoint, distances exactly at the tolerance."""
    n, k, m = rng.randint(0, 7), rng.randint(1, 4), rng.randint(0, 30)
    size = rng.choice([10, 20, 40])
    scores = torch.tensor([rng.choice([0.1, 0.2, 0.3, 0.5, 0.9]) for _ in range(n)], dtype=dtype)
    kxy = torch.tensor([[[rng.randint(0, size), rng.randint(0, size)] for _ in range(k)] for _ in range(n)],
                       dtype=dtype).reshape(n, k, 2)
    objs = []
    for _ in range(m):
        x, y, half = rng.randint(0, size), rng.randint(0, size), rng.randint(0, 3)
        score = rng.choice([0.0, 0.25, 0.5, 0.75, 1.0, rng.random()])
        objs.append([x - half, y - half, x + half + rng.randint(0, 1), y + half, score, rng.randrange(k)])
    kpo = torch.tensor(objs, dtype=dtype).reshape(m, 6)
    settings = _settings(conf_kp_person=rng.choice([0.0, 0.2, 0.3, 0.6]), tolerance=rng.choice([0.0, 3.0, 5.0, 10.0, 25.0, 1e6]))
    return torch.zeros(n, 4, dtype=dtype), scores, kxy, kpo, settings


# ----------------------------------------------------------------------------------------------
# Fusion

def test_fusion_equals_sequential_reference_on_random_cases():
    rng = random.Random(1234)
    differs_from_shortcut = 0
    for _ in range(600):
        boxes, scores, kxy, kpo, settings = _random_case(rng)
        args = (scores, kxy, kpo, settings.conf_kp_person, settings.tolerance)
        expected = fuse_keypoints_reference(*args)
        got = fuse_keypoints(boxes, scores, kxy, kpo, settings)
        assert got.shape == expected.shape and got.dtype == kxy.dtype
        assert torch.equal(got, expected), (scores, kxy, kpo, settings)
        differs_from_shortcut += not torch.equal(fuse_one_round(*args), expected)
    assert differs_from_shortcut >= 20  # the cases really depend on the order of updates


def test_fusion_float32_grid_and_real_valued_float64():
    rng = random.Random(7)
    for _ in range(200):  # float32 on an integer grid: every operation is exact
        boxes, scores, kxy, kpo, settings = _random_case(rng, torch.float32)
        expected = fuse_keypoints_reference(scores, kxy, kpo, settings.conf_kp_person, settings.tolerance)
        assert torch.equal(fuse_keypoints(boxes, scores, kxy, kpo, settings), expected.float())
    g = torch.Generator().manual_seed(3)
    for _ in range(200):  # arbitrary real coordinates in float64
        n, k, m = (int(v) for v in torch.randint(0, 9, (3,), generator=g))
        k = max(k, 1)
        kxy = torch.rand(n, k, 2, generator=g, dtype=torch.float64) * 100
        centres = torch.rand(m, 2, generator=g, dtype=torch.float64) * 100
        wh = torch.rand(m, 2, generator=g, dtype=torch.float64) * 8
        kpo = torch.cat((centres - wh / 2, centres + wh / 2, torch.rand(m, 1, generator=g, dtype=torch.float64),
                         torch.randint(0, k, (m, 1), generator=g).double()), 1)
        scores = torch.rand(n, generator=g, dtype=torch.float64)
        settings = _settings(conf_kp_person=0.3, tolerance=20.0)
        expected = fuse_keypoints_reference(scores, kxy, kpo, 0.3, 20.0)
        assert torch.equal(fuse_keypoints(torch.zeros(n, 4), scores, kxy, kpo, settings), expected)


def _box_at(x, y, score, kp, half=2.0):
    return [x - half, y - half, x + half, y + half, score, kp]


def test_fusion_moved_keypoint_captures_later_objects():
    # pose 0 keypoint at x=0, pose 1 at x=10. Object A (0.9) at x=4 moves pose 0's keypoint to 4.
    # Object B (0.8) at x=7 is now nearest to pose 0 (distance 3 < 3 to pose 1? no: 3 vs 3 -> tie,
    # first pose wins) and is rejected because 0.8 < 0.9 -- it is NOT given to pose 1.
    kxy = torch.tensor([[[0.0, 0.0]], [[10.0, 0.0]]])
    scores = torch.tensor([0.9, 0.9])
    kpo = torch.tensor([_box_at(4, 0, 0.9, 0), _box_at(7, 0, 0.8, 0)])
    out = fuse_keypoints(torch.zeros(2, 4), scores, kxy, kpo, _settings(tolerance=50))
    assert out.tolist() == [[[4.0, 0.0, pytest.approx(0.9)]], [[10.0, 0.0, 0.0]]]
    # object B slightly closer to pose 1 (x=7.5): pose 1 is its nearest -> fused
    kpo[1, [0, 2]] += 0.5
    out = fuse_keypoints(torch.zeros(2, 4), scores, kxy, kpo, _settings(tolerance=50))
    assert out[1, 0].tolist() == [7.5, 0.0, pytest.approx(0.8)]


def test_fusion_nearest_pose_with_higher_confidence_rejects():
    kxy = torch.tensor([[[0.0, 0.0]], [[20.0, 0.0]]])
    kpo = torch.tensor([_box_at(1, 0, 0.9, 0), _box_at(2, 0, 0.5, 0)])
    out = fuse_keypoints(torch.zeros(2, 4), torch.tensor([1.0, 1.0]), kxy, kpo, _settings(tolerance=50))
    assert out[0, 0, 2].item() == pytest.approx(0.9) and out[0, 0, 0].item() == 1.0
    assert out[1, 0].tolist() == [20.0, 0.0, 0.0]  # the 0.5 object is not passed on to pose 1


def test_fusion_distance_exactly_at_tolerance_is_rejected():
    kxy = torch.tensor([[[0.0, 0.0]]])
    at = torch.tensor([_box_at(3, 4, 0.9, 0)])  # distance 5
    assert fuse_keypoints(torch.zeros(1, 4), torch.tensor([1.0]), kxy, at, _settings(tolerance=5))[0, 0, 2] == 0
    out = fuse_keypoints(torch.zeros(1, 4), torch.tensor([1.0]), kxy, at, _settings(tolerance=5.001))
    assert out[0, 0].tolist() == [3.0, 4.0, pytest.approx(0.9)]


def test_fusion_equal_scores_first_object_wins_and_score_must_exceed():
    kxy = torch.tensor([[[0.0, 0.0]]])
    kpo = torch.tensor([_box_at(1, 0, 0.5, 0), _box_at(-1, 0, 0.5, 0)])
    out = fuse_keypoints(torch.zeros(1, 4), torch.tensor([1.0]), kxy, kpo, _settings())
    assert out[0, 0].tolist() == [1.0, 0.0, 0.5]
    out = fuse_keypoints(torch.zeros(1, 4), torch.tensor([1.0]), kxy, kpo.flip(0), _settings())
    assert out[0, 0].tolist() == [-1.0, 0.0, 0.5]
    zero = torch.tensor([_box_at(1, 0, 0.0, 0)])  # score 0 never beats the initial confidence 0
    assert fuse_keypoints(torch.zeros(1, 4), torch.tensor([1.0]), kxy, zero, _settings())[0, 0].tolist() == [0, 0, 0]


def test_fusion_low_score_poses_keep_regressed_keypoints_with_zero_confidence():
    kxy = torch.tensor([[[0.0, 0.0], [5.0, 5.0]], [[30.0, 0.0], [35.0, 5.0]]])
    scores = torch.tensor([0.25, 0.9])  # pose 0 at or below conf_kp_person 0.3 does not take part
    kpo = torch.tensor([_box_at(1, 0, 0.9, 0), _box_at(31, 0, 0.8, 0)])
    out = fuse_keypoints(torch.zeros(2, 4), scores, kxy, kpo, _settings(conf_kp_person=0.3, tolerance=50))
    assert out[0].tolist() == [[0.0, 0.0, 0.0], [5.0, 5.0, 0.0]]
    # the best object goes to pose 1 (distance 29 < 50), so the 0.8 one is rejected there
    assert out[1].tolist() == [[1.0, 0.0, pytest.approx(0.9)], [35.0, 5.0, 0.0]]
    out = fuse_keypoints(torch.zeros(2, 4), torch.tensor([0.3, 0.3]), kxy, kpo, _settings(conf_kp_person=0.3))
    assert torch.equal(out[..., :2], kxy) and out[..., 2].eq(0).all()  # score must be > conf_kp_person


def test_fusion_half_precision_inputs_far_apart():
    # squared distances of several hundred pixels overflow float16; matching must still be right
    kxy = torch.tensor([[[0.0, 0.0]], [[1000.0, 0.0]]], dtype=torch.float16)
    kpo = torch.tensor([_box_at(400, 0, 0.75, 0), _box_at(750, 0, 0.5, 0)], dtype=torch.float16)
    out = fuse_keypoints(torch.zeros(2, 4), torch.ones(2, dtype=torch.float16), kxy, kpo, _settings(tolerance=450))
    assert out.dtype == torch.float16
    assert out.float().tolist() == [[[400.0, 0.0, 0.75]], [[750.0, 0.0, 0.5]]]


def test_fusion_empty_inputs_and_no_mutation():
    s = _settings()
    assert fuse_keypoints(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, 5, 2), torch.rand(4, 6), s).shape == (0, 5, 3)
    kxy = torch.rand(3, 5, 2)
    out = fuse_keypoints(torch.zeros(3, 4), torch.ones(3), kxy, torch.zeros(0, 6), s)
    assert torch.equal(out[..., :2], kxy) and out[..., 2].eq(0).all()
    boxes, scores, kxy, kpo, settings = _random_case(random.Random(5))
    copies = [t.clone() for t in (boxes, scores, kxy, kpo)]
    fuse_keypoints(boxes, scores, kxy, kpo, settings)
    assert all(torch.equal(a, b) for a, b in zip(copies, (boxes, scores, kxy, kpo)))
    with pytest.raises(ValueError):
        fuse_keypoints(torch.zeros(2, 4), torch.ones(3), torch.zeros(3, 5, 2), kpo, settings)


# ----------------------------------------------------------------------------------------------
# Mapping to original pixels

def _letterbox_params(h, w, new_h, new_w):
    r = min(new_h / h, new_w / w)
    return r, ((new_w - w * r) / 2, (new_h - h * r) / 2)


@pytest.mark.parametrize("shape", [(480, 640), (640, 427), (100, 1000)])
def test_scale_to_original_inverts_letterbox(shape):
    h, w = shape
    r, pad = _letterbox_params(h, w, 640, 640)
    g = torch.Generator().manual_seed(1)
    pts = torch.rand(7, 5, 2, generator=g, dtype=torch.float64) * torch.tensor([w, h], dtype=torch.float64)
    net = pts * r + torch.tensor(pad, dtype=torch.float64)
    for ratio in (r, (r, r)):
        assert torch.allclose(scale_to_original(net, ratio, pad, shape), pts, atol=1e-9)
    boxes = torch.cat((pts[:, 0], pts[:, 0] + 3), 1).clamp(max=min(h, w))  # (7, 4) x1, y1, x2, y2
    assert torch.allclose(scale_to_original(boxes * r + torch.tensor(pad * 2, dtype=torch.float64), r, pad, shape), boxes)
    flat = net.reshape(7, 10)  # (n, 2K) keypoints keep their shape
    assert scale_to_original(flat, r, pad, shape).shape == (7, 10)


@pytest.mark.parametrize("shape,auto", [((480, 640), False), ((333, 500), True), ((700, 300), False)])
def test_scale_to_original_inverts_the_data_letterbox(shape, auto):
    letterbox_module = pytest.importorskip("kapao.data.letterbox")
    np = pytest.importorskip("numpy")
    h, w = shape
    img = np.zeros((h, w, 3), np.uint8)
    points = [(w // 5, h // 3), (w - 40, h - 30), (w // 2, 20)]
    for x, y in points:
        img[y - 5:y + 5, x - 5:x + 5] = 255  # 10 x 10 white square centred on (x, y)
    out, ratio, pad = letterbox_module.letterbox(img, 512, auto=auto)
    found = []
    for x, y in points:  # locate each square in the letterboxed image around its expected place
        mask = out[..., 0] > 127
        ys, xs = np.nonzero(mask)
        near = (abs(xs - (x * ratio[0] + pad[0])) < 15) & (abs(ys - (y * ratio[1] + pad[1])) < 15)
        found.append([(xs[near].min() + xs[near].max() + 1) / 2, (ys[near].min() + ys[near].max() + 1) / 2])
    back = scale_to_original(torch.tensor(found, dtype=torch.float64), ratio, pad, shape)
    assert torch.allclose(back, torch.tensor(points, dtype=torch.float64), atol=1.5)


def test_scale_to_original_non_uniform_ratio_and_clipping():
    pts = torch.tensor([[[10.0, 20.0], [-5.0, 300.0], [700.0, -1.0]]])
    out = scale_to_original(pts, (0.5, 2.0), (4.0, 6.0), (150, 200))
    assert out.tolist() == [[[12.0, 7.0], [0.0, 147.0], [200.0, 0.0]]]
    unclipped = scale_to_original(pts, (0.5, 2.0), (4.0, 6.0), (150, 200), clip=False)
    assert unclipped.tolist() == [[[12.0, 7.0], [-18.0, 147.0], [1392.0, -3.5]]]
    original = pts.clone()
    scale_to_original(pts, 0.5, (1, 1), (10, 10))
    assert torch.equal(pts, original)


def test_postprocess_maps_then_fuses_with_tolerance_in_original_pixels():
    k = 1
    lay = HeadLayout(k)

    def row(cx, cy, w, h, obj, classes, kps):
        r = torch.zeros(lay.num_outputs)
        r[lay.box] = torch.tensor([cx, cy, w, h], dtype=torch.float32)
        r[lay.obj] = obj
        r[lay.cls] = torch.tensor(classes)
        r[lay.kpt] = torch.tensor(kps, dtype=torch.float32)
        return r

    pred = torch.stack([
        row(100, 120, 40, 60, 0.9, [1.0, 0.0], [100, 100]),  # person, keypoint at (100, 100)
        row(100, 115, 4, 4, 0.9, [0.0, 1.0], [0, 0]),  # keypoint object 15 px below (network input)
    ])[None]
    meta = ((200, 300), 0.5, (10.0, 20.0))  # original 200 x 300 letterboxed at ratio 0.5
    settings = PREDICT_SETTINGS.replace(tolerance=25.0)  # 15 px in the input = 30 px in the original
    (p,) = postprocess(pred, settings, lay, [meta], return_kp_objects=True)
    assert p.boxes.tolist() == [[140.0, 140.0, 220.0, 200.0]]  # y2 260 clipped to h = 200
    assert p.keypoints.tolist() == [[[180.0, 160.0, 0.0]]]  # not fused: 30 px >= 25
    assert p.kp_objects.tolist() == [[176.0, 186.0, 184.0, 194.0, pytest.approx(0.9), 0.0]]
    (p,) = postprocess(pred, settings.replace(tolerance=31.0), lay, [meta])
    assert p.keypoints.tolist() == [[[180.0, 190.0, pytest.approx(0.9)]]] and p.kp_objects is None
    assert p.fused.tolist() == [[True]]
    (p,) = postprocess(pred, settings.replace(tolerance=31.0, fuse=False), lay, [meta])
    # not fused, but the keypoint object 30 px away (< 31) is its evidence
    assert p.keypoints.tolist() == [[[180.0, 160.0, pytest.approx(0.9)]]] and p.fused.tolist() == [[False]]
    as_dict = {"orig_shape": (200, 300), "ratio": (0.5, 0.5), "pad": (10, 20), "image_id": 3}
    (q,) = postprocess(pred, settings.replace(tolerance=31.0), lay, [as_dict])
    assert q.keypoints.tolist() == [[[180.0, 190.0, pytest.approx(0.9)]]] and q.boxes.tolist() == [[140.0, 140.0, 220.0, 200.0]]
    (p,) = postprocess(pred, settings.replace(tolerance=31.0), lay, None)  # network-input pixels
    assert p.keypoints.tolist() == [[[100.0, 115.0, pytest.approx(0.9)]]]
    with pytest.raises(ValueError):
        postprocess(pred, settings, lay, [meta, meta])
    with pytest.raises(ValueError, match="image meta"):
        postprocess(pred, settings, lay, [{"orig_shape": (200, 300), "ratio": None, "pad": None}])


def test_postprocess_empty_batch_and_images():
    lay = HeadLayout(2)
    assert postprocess(torch.zeros(0, 3, lay.num_outputs), VAL_SETTINGS, lay) == []
    out = postprocess(torch.zeros(2, 0, lay.num_outputs), VAL_SETTINGS, lay, [((10, 10), 1.0, (0, 0))] * 2, True)
    assert [len(p) for p in out] == [0, 0]
    assert out[0].keypoints.shape == (0, 2, 3) and out[0].kp_objects.shape == (0, 6)


# ----------------------------------------------------------------------------------------------
# Serialisation of postprocess output (the result type itself: tests/test_poses.py)

def test_postprocess_output_serialises_to_coco():
    pred = _random_pred(b=1, n=200, seed=4).float()
    pred[..., LT.obj] = pred[..., LT.obj] * 0.2 + 0.8
    (p,) = postprocess(pred, VAL_SETTINGS, LT, [((240, 320), 1.0, (0.0, 40.0))])
    assert len(p) > 0
    results = p.to_coco(image_id=7)
    assert len(results) == len(p) and all(len(r["keypoints"]) == 3 * LT.num_keypoints for r in results)
    kp = p.keypoints
    assert (kp[..., 0] >= 0).all() and (kp[..., 0] <= 320).all() and (kp[..., 1] >= 0).all() and (kp[..., 1] <= 240).all()
    assert math.isclose(max(r["score"] for r in results), p.scores.max().item(), abs_tol=1e-5)


# A confidence for every keypoint; fused positions, fused confidences and person scores unchanged

def _scene(seed, b=2, k=4, persons=5, width=320.0, dtype=torch.float64):
    """Decoded predictions that look like a network's: persons with keypoints, keypoint-object anchors
    scattered around those keypoints (some within, some beyond the tolerance), and background."""
    g = torch.Generator().manual_seed(seed)
    lay = HeadLayout(k)
    rows = []
    for _ in range(b):
        img = []
        for _ in range(persons):
            c = torch.rand(2, generator=g, dtype=dtype) * width
            kps = c + (torch.rand(k, 2, generator=g, dtype=dtype) - 0.5) * 80
            for _ in range(3):  # duplicates for NMS
                r = torch.zeros(lay.num_outputs, dtype=dtype)
                r[:2], r[2:4] = c + torch.rand(2, generator=g, dtype=dtype) * 4, torch.tensor([60.0, 120.0])
                r[lay.obj] = 0.5 + 0.5 * torch.rand((), generator=g, dtype=dtype)
                r[lay.cls] = torch.rand(lay.num_classes, generator=g, dtype=dtype) * 0.3
                r[lay.cls.start] = 0.4 + 0.6 * torch.rand((), generator=g, dtype=dtype)
                r[lay.kpt] = (kps + torch.randn(k, 2, generator=g, dtype=dtype) * 3).flatten()
                img.append(r)
            for j in range(k):
                for _ in range(3):
                    r = torch.zeros(lay.num_outputs, dtype=dtype)
                    r[:2] = kps[j] + torch.randn(2, generator=g, dtype=dtype) * 12
                    r[2:4] = 16.0
                    r[lay.obj] = torch.rand((), generator=g, dtype=dtype)
                    r[lay.cls] = torch.rand(lay.num_classes, generator=g, dtype=dtype) * 0.4
                    r[lay.cls.start + 1 + j] = torch.rand((), generator=g, dtype=dtype)
                    img.append(r)
        bg = torch.rand(60, lay.num_outputs, generator=g, dtype=dtype)
        bg[:, :4] *= width
        bg[:, lay.obj] *= 0.05
        img.extend(bg)
        rows.append(torch.stack(img))
    return torch.stack(rows), lay


def _old_postprocess(pred, settings, lay, metas):
    """Today's (official) output: nms -> map to original pixels -> the sequential fusion reference."""
    out = []
    for d, (shape, r, pad) in zip(nms(pred, settings, lay), metas):
        boxes = scale_to_original(d.boxes, r, pad, shape)
        kxy = scale_to_original(d.keypoints, r, pad, shape)
        kpo = torch.cat((scale_to_original(d.kp_objects[:, :4], r, pad, shape), d.kp_objects[:, 4:]), 1)
        out.append((boxes, d.scores, fuse_keypoints_reference(d.scores, kxy, kpo, settings.conf_kp_person,
                                                                settings.tolerance), kxy))
    return out


def _evidence_reference(pred_i, lay, kxy, meta, tolerance, floor=KP_EVIDENCE_FLOOR):
    """Plain loops: best objectness x p(k + 1) of any anchor within the tolerance, floors applied."""
    (h, w), r, (padw, padh) = meta
    conf = torch.zeros(kxy.shape[:2], dtype=torch.float64)
    for a in pred_i.tolist():
        obj = a[lay.obj]
        cx, cy = min(max((a[0] - padw) / r, 0), w), min(max((a[1] - padh) / r, 0), h)
        for j in range(lay.num_keypoints):
            s = obj * a[lay.cls.start + 1 + j]
            if obj <= floor or s <= floor:
                continue
            for n in range(kxy.shape[0]):
                x, y = kxy[n, j].tolist()
                if (cx - x) ** 2 + (cy - y) ** 2 < tolerance ** 2 and s > conf[n, j]:
                    conf[n, j] = s
    return conf


@pytest.mark.parametrize("seed", range(4))
def test_postprocess_keeps_official_output_and_fills_unfused_confidences(seed):
    pred, lay = _scene(seed)
    metas = [((400, 500), 1.25, (8.0, 0.0)), ((260, 300), 0.9, (0.0, 12.0))]
    settings = VAL_SETTINGS.replace(tolerance=20.0)
    got = postprocess(pred, settings, lay, metas)
    fused_total = unfused_with_conf = 0
    for p, (boxes, scores, ref, kxy), meta, pred_i in zip(got, _old_postprocess(pred, settings, lay, metas), metas, pred):
        assert len(p) > 2
        assert torch.equal(p.boxes, boxes) and torch.equal(p.scores, scores)
        assert torch.equal(p.keypoints[..., :2], ref[..., :2])  # every position as today
        assert torch.equal(p.fused, ref[..., 2] > 0)  # fused == "confidence > 0 under the old rule"
        assert torch.equal(p.keypoints[..., 2][p.fused], ref[..., 2][p.fused])
        expected = _evidence_reference(pred_i, lay, kxy, meta, settings.tolerance)
        assert torch.equal(p.keypoints[..., 2][~p.fused], expected[~p.fused])
        fused_total += int(p.fused.sum())
        unfused_with_conf += int((p.keypoints[..., 2][~p.fused] > 0).sum())
    assert fused_total > 0 and unfused_with_conf > 0  # the scenes exercise both kinds


def test_postprocess_float32_and_batch_independence():
    pred, lay = _scene(11)
    pred = pred.float()
    metas = [((400, 500), 1.25, (8.0, 0.0))] * 2
    both = postprocess(pred, VAL_SETTINGS, lay, metas)
    for i in range(2):
        (alone,) = postprocess(pred[i:i + 1], VAL_SETTINGS, lay, metas[i:i + 1])
        assert torch.equal(alone.keypoints, both[i].keypoints) and torch.equal(alone.fused, both[i].fused)
    assert both[0].keypoints.dtype == torch.float32 and both[0].fused.dtype == torch.bool


def test_keypoint_evidence_floor_and_cap():
    lay = HeadLayout(2)
    rows = torch.zeros(1, 4, lay.num_outputs)
    rows[0, :, :2] = torch.tensor([[10.0, 20.0], [30.0, 40.0], [50.0, 60.0], [70.0, 80.0]])
    rows[0, :, lay.obj] = torch.tensor([0.5, 0.5, KP_EVIDENCE_FLOOR, 1.0])
    rows[0, :, lay.cls] = torch.tensor([[1.0, 0.5, 0.01], [0.0, 0.0, 0.9], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    (ev,) = keypoint_evidence(rows, lay)
    # anchor 0: type 0 (0.25; type 1 0.005 is below the floor), anchor 1: type 1 (0.45); anchor 2's
    # objectness is not above the floor; anchor 3 has no keypoint class. Whatever the argmax class.
    assert ev.tolist() == [[10.0, 20.0, 0.25, 0.0], [30.0, 40.0, pytest.approx(0.45), 1.0]]
    assert [e.shape for e in keypoint_evidence(torch.zeros(3, 0, lay.num_outputs), lay)] == [(0, 4)] * 3


def test_keypoint_confidence_strict_tolerance_type_and_chunks(monkeypatch):
    kxy = torch.tensor([[[0.0, 0.0], [10.0, 0.0]], [[100.0, 0.0], [110.0, 0.0]]])
    ev = torch.tensor([[3.0, 4.0, 0.6, 0.0],  # distance 5 to pose 0's type 0
                       [1.0, 0.0, 0.3, 0.0],  # closer but lower: the best score wins, not the nearest
                       [10.0, 0.0, 0.9, 0.0],  # on pose 0's type-1 keypoint, but of type 0: 10 px from kp 0
                       [104.0, 0.0, 0.7, 1.0]])  # pose 1 type 1, 6 px
    conf = keypoint_confidence(kxy, ev, 5.0)
    assert conf.tolist() == [[pytest.approx(0.3), 0.0], [0.0, 0.0]]  # 5 px is not < 5, 6 px neither
    conf = keypoint_confidence(kxy, ev, 10.5)
    assert conf.tolist() == [[pytest.approx(0.9), 0.0], [0.0, pytest.approx(0.7)]]
    import kapao.infer.postprocess as pp

    monkeypatch.setattr(pp, "_EVIDENCE_CHUNK", 2)  # one evidence row per step: same result
    assert torch.equal(pp.keypoint_confidence(kxy, ev, 10.5), conf)
    assert keypoint_confidence(torch.zeros(0, 2, 2), ev, 5.0).shape == (0, 2)
    assert keypoint_confidence(kxy, torch.zeros(0, 4), 5.0).eq(0).all()
    half = keypoint_confidence(kxy.half() * 5, (ev * torch.tensor([5.0, 5.0, 1.0, 1.0])).half(), 52.5)
    assert half.dtype == torch.float16 and half.float().tolist() == [[pytest.approx(0.9, abs=1e-3), 0.0],
                                                                     [0.0, pytest.approx(0.7, abs=1e-3)]]


def _dense_keypoint_confidence(keypoints_xy, evidence, tolerance):
    """The previous keypoint_confidence (all pairs): every keypoint against every evidence row of its type."""
    n, k = keypoints_xy.shape[:2]
    work = torch.promote_types(keypoints_xy.dtype, torch.float32)
    conf = torch.zeros(n, k, dtype=work)
    if n == 0 or evidence.shape[0] == 0:
        return conf.to(keypoints_xy.dtype)
    kxy, ev = keypoints_xy.to(work), evidence.to(work)
    kind = ev[:, 3].long()
    dx, dy = kxy[:, kind, 0] - ev[None, :, 0], kxy[:, kind, 1] - ev[None, :, 1]
    s = torch.where(dx * dx + dy * dy < float(tolerance) * float(tolerance), ev[None, :, 2], 0.0)
    return conf.scatter_reduce(1, kind.expand(n, -1), s, "amax").to(keypoints_xy.dtype)


def _confidence_case(g, n, k, p, spread, tolerance, grid=None):
    """Poses (n, k, 2) and evidence (p, 4) around a few centres; with `grid`, coordinates on multiples of
    grid (cell borders, distances exactly at the tolerance)."""
    centres = (torch.rand(3, 2, generator=g, dtype=torch.float64) - 0.3) * spread
    kxy = centres[torch.randint(0, 3, (n,), generator=g)][:, None] + torch.randn(n, k, 2, generator=g) * tolerance * 2
    exy = centres[torch.randint(0, 3, (p,), generator=g)] + torch.randn(p, 2, generator=g) * tolerance * 3
    if grid:
        kxy, exy = (kxy / grid).round() * grid, (exy / grid).round() * grid
    scores = torch.randint(1, 40, (p, 1), generator=g) / 40  # many exact ties
    ev = torch.cat((exy, scores.double(), torch.randint(0, k, (p, 1), generator=g).double()), 1)
    return kxy, ev


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_keypoint_confidence_grid_equals_all_pairs(dtype, monkeypatch):
    """Bucketing evidence on a grid finds exactly the maxima of comparing every pair: random clusters,
    coordinates on cell borders and at exactly the tolerance, negative and far-out coordinates, tiny
    chunks, non-finite values."""
    import kapao.infer.postprocess as pp

    g = torch.Generator().manual_seed(3)
    cases = []
    for tolerance, spread, grid in ((25.0, 800.0, None), (25.0, 300.0, 12.5), (10.0, 200.0, 5.0), (50.0, 1500.0, None),
                                    (0.5, 4e6, None), (3.0, 60.0, 1.0)):
        n, k, p = int(torch.randint(1, 40, ())), int(torch.randint(1, 18, ())), int(torch.randint(1, 3000, ()))
        cases.append((tolerance, *_confidence_case(g, n, k, p, spread, tolerance, grid)))
    tolerance, kxy, ev = cases[0]
    kxy, ev = kxy.clone(), ev.clone()
    kxy[0, 0, 0], kxy[1 % len(kxy), -1] = float("nan"), float("inf")
    ev[:5, 0], ev[5:9, 1] = float("nan"), float("-inf")
    cases.append((tolerance, kxy, ev))
    checked = 0
    for chunk in (pp._EVIDENCE_CHUNK, 7):
        monkeypatch.setattr(pp, "_EVIDENCE_CHUNK", chunk)
        for tolerance, kxy, ev in cases:
            kxy, ev = kxy.to(dtype), ev.to(dtype)
            if dtype == torch.float16 and not torch.isfinite(ev[:, :2]).all():
                continue
            got = pp.keypoint_confidence(kxy, ev, tolerance)
            want = _dense_keypoint_confidence(kxy, ev, tolerance)
            assert got.dtype == want.dtype == dtype and torch.equal(got, want)
            wanted = torch.rand(kxy.shape[:2], generator=g) < 0.5
            assert torch.equal(pp.keypoint_confidence(kxy, ev, tolerance, wanted), torch.where(wanted, want, 0.0))
            checked += int((want > 0).sum())
    assert checked > 500  # the cases exercise many keypoints with evidence
    tolerance, kxy, ev = cases[0]
    assert pp.keypoint_confidence(kxy, ev, 0.0).eq(0).all()  # nothing lies at distance < 0


def test_keypoint_evidence_cap_keeps_the_highest_and_first_ties(monkeypatch):
    """Over MAX_NMS passing rows: the MAX_NMS highest, ties at the cut in (anchor, type) order."""
    import kapao.infer.postprocess as pp

    lay = HeadLayout(4)
    g = torch.Generator().manual_seed(2)
    pred = torch.rand(2, 300, lay.num_outputs, generator=g)
    pred[..., lay.cls] = torch.randint(0, 5, (2, 300, lay.num_classes), generator=g) / 4  # ties; some below the floor
    pred[..., lay.obj] = torch.where(torch.rand(2, 300, generator=g) < 0.1, 0.0, 1.0)
    uncapped = keypoint_evidence(pred, lay)
    monkeypatch.setattr(pp, "MAX_NMS", 150)
    capped = pp.keypoint_evidence(pred, lay)
    for full, cut in zip(uncapped, capped):
        assert len(full) > 150 and len(cut) == 150
        first = torch.sort(full[:, 2], descending=True, stable=True).indices[:150]
        assert torch.equal(cut, full[torch.sort(first).values])

def test_tta_merged_output_carries_confidence_and_fused_flag():
    pred, lay = _scene(5, b=1, k=LT.num_keypoints, persons=3)
    assert lay == LT
    passes = [_network_view(pred, s, f, 320.0) for s, f in zip(TTA_SCALES, TTA_FLIPS)]
    merged = merge_tta(passes, TTA_SCALES, TTA_FLIPS, 320.0, LT, FLIP)
    meta = [((300, 320), 1.0, (0.0, 0.0))]
    settings = VAL_SETTINGS.replace(tolerance=20.0)
    (p,) = postprocess(merged, settings, LT, meta)
    ((boxes, scores, ref, kxy),) = _old_postprocess(merged, settings, LT, meta)
    assert torch.equal(p.boxes, boxes) and torch.equal(p.keypoints[..., :2], ref[..., :2])
    assert torch.equal(p.fused, ref[..., 2] > 0) and p.fused.any()
    expected = _evidence_reference(merged[0], LT, kxy, meta[0], settings.tolerance)
    assert torch.allclose(p.keypoints[..., 2][~p.fused], expected[~p.fused], rtol=0, atol=1e-12)
    assert (p.keypoints[..., 2][~p.fused] > 0).any()
