"""Target assignment and the KAPAO loss: hand-computed cases, a brute-force reference, and overfitting
one real coco-mini image."""
from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from ultralytics.utils.metrics import bbox_iou

from kapao.cfg.schema import OBJ_LEVEL_WEIGHTS, STRIDES, HeadLayout, TargetLayout
from kapao.cfg.settings import Hyp
from kapao.models.loss import KapaoLoss, LossGains, assign_targets
from kapao.models.network import decode, kapao_n


def _target(k: int, cls: int, cx: float, cy: float, w: float, h: float, kpts=(), image: int = 0) -> list[float]:
    """One TargetLayout row; kpts = [(k_index, x, y, v)], all normalised."""
    row = [float(image), float(cls), cx, cy, w, h] + [0.0] * 3 * k
    for j, x, y, v in kpts:
        row[6 + 3 * j: 9 + 3 * j] = [x, y, v]
    return row


def _cells(level) -> list[tuple[int, int, int]]:
    """Sorted (anchor, gi, gj) of a level's assignments."""
    return sorted(zip(level.anchor.tolist(), level.gi.tolist(), level.gj.tolist()))


# ---------------------------------------------------------------------------------------------
# gains
def test_gains_scaled_like_official_training():
    g = LossGains.from_hyp(Hyp(), num_classes=18, imgsz=1280, num_levels=4)
    assert g.box == pytest.approx(0.05 * 0.75)
    assert g.obj == pytest.approx(0.7 * 4 * 0.75)
    assert g.cls == pytest.approx(0.3 * 18 / 80 * 0.75)
    assert g.kp == pytest.approx(0.025 * 0.75)


# ---------------------------------------------------------------------------------------------
# target assignment, hand-computed on an 8x8 grid (normalised coordinate = grid coordinate / 8)
ONE_ANCHOR = torch.tensor([[[2.0, 2.0]]])  # one level, one anchor of 2x2 cells


def test_assignment_own_cell_plus_nearest_neighbours():
    k = 1
    t = torch.tensor([_target(k, 0, 3.25 / 8, 5.75 / 8, 2 / 8, 2 / 8, [(0, 3.6 / 8, 5.1 / 8, 2)])])
    (lvl,) = assign_targets(t, [(8, 8)], ONE_ANCHOR, k)
    # x: 0.25 into cell 3 -> also the left cell 2; y: 0.75 into cell 5 -> also the cell below, 6
    assert _cells(lvl) == [(0, 2, 5), (0, 3, 5), (0, 3, 6)]
    by_cell = {(gi, gj): i for i, (gi, gj) in enumerate(zip(lvl.gi.tolist(), lvl.gj.tolist()))}
    box = lvl.box
    assert torch.allclose(box[by_cell[(3, 5)]], torch.tensor([0.25, 0.75, 2, 2]))
    assert torch.allclose(box[by_cell[(2, 5)]], torch.tensor([1.25, 0.75, 2, 2]))
    assert torch.allclose(box[by_cell[(3, 6)]], torch.tensor([0.25, -0.25, 2, 2]))
    kp = lvl.keypoints[:, 0]
    assert torch.allclose(kp[by_cell[(3, 5)]], torch.tensor([0.6, 0.1, 2]), atol=1e-6)
    assert torch.allclose(kp[by_cell[(2, 5)]], torch.tensor([1.6, 0.1, 2]), atol=1e-6)
    assert torch.allclose(kp[by_cell[(3, 6)]], torch.tensor([0.6, -0.9, 2]), atol=1e-6)
    assert lvl.cls.tolist() == [0, 0, 0] and lvl.image.tolist() == [0, 0, 0]
    assert torch.equal(lvl.anchor_wh, torch.tensor([[2.0, 2.0]] * 3))


def test_assignment_centre_on_cell_border():
    # x exactly on the border between cells 3 and 4: both sides; the own cell (4) comes twice, as in
    # the official rule. y = 2.5, the middle of a cell: no vertical neighbour.
    t = torch.tensor([_target(1, 0, 4.0 / 8, 2.5 / 8, 2 / 8, 2 / 8)])
    (lvl,) = assign_targets(t, [(8, 8)], ONE_ANCHOR, 1)
    assert _cells(lvl) == [(0, 3, 2), (0, 4, 2), (0, 4, 2)]


def test_assignment_no_neighbours_outside_or_at_image_border():
    t = torch.tensor([
        _target(1, 0, 0.3 / 8, 0.5 / 8, 2 / 8, 2 / 8),  # near the left/top border: no left/up neighbour
        _target(1, 0, 7.8 / 8, 7.5 / 8, 2 / 8, 2 / 8),  # near the right border, middle of its row
        _target(1, 0, 0.9 / 8, 7.2 / 8, 2 / 8, 2 / 8),  # nearer the right and top edges of its cell
    ])
    (lvl,) = assign_targets(t, [(8, 8)], ONE_ANCHOR, 1)
    # 1st: x 0.3 is in the left half of cell 0 but there is no cell -1; y 0.5 is no half -> own only.
    # 2nd: x 7.8 is in the right half of the last column -> own only. 3rd: right (1, 7) and up (0, 6)
    # neighbours, no cell below the last row.
    assert _cells(lvl) == sorted([(0, 0, 0), (0, 7, 7), (0, 0, 7), (0, 1, 7), (0, 0, 6)])


def test_assignment_anchor_ratio_rule():
    anchors = torch.tensor([[[1.0, 1.0], [4.0, 4.0], [20.0, 20.0]]])
    t = torch.tensor([
        _target(1, 0, 3.5 / 8, 3.5 / 8, 3 / 8, 3 / 8),  # ratios 3, 1.33, 6.67 -> anchors 0 and 1
        _target(1, 2, 1.5 / 8, 1.5 / 8, 4 / 8, 1 / 8),  # vs (1,1): w ratio exactly 4 -> not < 4
    ])
    (lvl,) = assign_targets(t, [(8, 8)], anchors, 1)
    got = sorted(zip(lvl.anchor.tolist(), lvl.cls.tolist()))
    # second target vs anchor (4,4): w 1.0, h ratio 4 -> rejected too; vs (20,20): 5 and 20 -> rejected
    assert got == [(0, 0), (1, 0)]
    assert _cells(lvl) == [(0, 3, 3), (1, 3, 3)]


def test_assignment_scales_per_level_and_keeps_image_index():
    anchors = torch.tensor([[[2.0, 2.0]], [[1.0, 1.0]]])  # level 0: 8x8, level 1: 4x4
    t = torch.tensor([_target(1, 5, 0.5625, 0.5625, 0.25, 0.25, image=3)])  # 4.5 cells of 8 / 2.25 of 4
    lv0, lv1 = assign_targets(t, [(8, 8), (4, 4)], anchors, 1)
    assert _cells(lv0) == [(0, 4, 4)]  # 4.5: middle of cell 4, no neighbour
    assert _cells(lv1) == [(0, 1, 2), (0, 2, 1), (0, 2, 2)]  # 2.25: left and up neighbours
    assert lv1.image.tolist() == [3, 3, 3] and lv1.cls.tolist() == [5, 5, 5]
    assert torch.allclose(lv1.box[:, 2:], torch.tensor([[1.0, 1.0]] * 3))


def _reference_assign(targets, grid, anchors, anchor_t=4.0):
    """Brute force over targets x anchors x candidate cells, written from the rule in plain Python."""
    ny, nx = grid
    out = []
    for t in targets.tolist():
        gx, gy, gw, gh = t[2] * nx, t[3] * ny, t[4] * nx, t[5] * ny
        for a, (aw, ah) in enumerate(anchors.tolist()):
            if max(gw / aw, aw / gw, gh / ah, ah / gh) >= anchor_t:
                continue
            cells = [(int(gx), int(gy))]
            if gx % 1 < 0.5 and gx > 1:
                cells.append((int(gx - 0.5), int(gy)))
            if gy % 1 < 0.5 and gy > 1:
                cells.append((int(gx), int(gy - 0.5)))
            if (nx - gx) % 1 < 0.5 and nx - gx > 1:
                cells.append((int(gx + 0.5), int(gy)))
            if (ny - gy) % 1 < 0.5 and ny - gy > 1:
                cells.append((int(gx), int(gy + 0.5)))
            out += [(a, min(max(i, 0), nx - 1), min(max(j, 0), ny - 1)) for i, j in cells]
    return sorted(out)


def test_assignment_matches_brute_force_reference():
    g = torch.Generator().manual_seed(0)
    k, m = 3, 60
    t = torch.zeros(m, TargetLayout(k).width)
    t[:, 2:4] = torch.rand(m, 2, generator=g)
    t[:, 4:6] = torch.rand(m, 2, generator=g) * 0.5 + 0.01
    anchors = torch.tensor([[[1.0, 1.5], [3.0, 2.0], [2.5, 6.0]], [[0.6, 0.9], [1.2, 0.8], [2.0, 3.0]]])
    grids = [(10, 12), (5, 6)]
    levels = assign_targets(t, grids, anchors, k)
    for lvl, grid, anc in zip(levels, grids, anchors):
        assert _cells(lvl) == _reference_assign(t, grid, anc)
        assert len(lvl) > m  # neighbours were added


def test_assignment_empty_and_inputs_unchanged():
    k = 2
    empty = torch.zeros(0, TargetLayout(k).width)
    levels = assign_targets(empty, [(8, 8), (4, 4)], torch.ones(2, 3, 2), k)
    assert [len(lv) for lv in levels] == [0, 0] and levels[0].keypoints.shape == (0, k, 3)
    t = torch.tensor([_target(k, 0, 0.3, 0.4, 0.2, 0.2, [(1, 0.31, 0.42, 1)])])
    before = t.clone()
    assign_targets(t, [(8, 8)], torch.ones(1, 3, 2), k)
    assert torch.equal(t, before)
    with pytest.raises(ValueError, match="targets must be"):
        assign_targets(torch.zeros(1, 6), [(8, 8)], torch.ones(1, 3, 2), k)


# ---------------------------------------------------------------------------------------------
# the loss on hand-built predictions
@pytest.fixture(scope="module")
def model_k2():
    torch.manual_seed(0)
    return kapao_n(2)


def _zeros_raw(k: int, b: int = 1, hw: int = 128, requires_grad: bool = False) -> list[torch.Tensor]:
    no = HeadLayout(k).num_outputs
    return [torch.zeros(b, 3, hw // s, hw // s, no, requires_grad=requires_grad) for s in STRIDES]


def test_loss_values_hand_computed(model_k2):
    """Zero logits predict a box of the anchor's size at the cell centre and keypoints at the cell
    corner; a target built to match exactly gives box loss 0 and a known keypoint distance."""
    k, imgsz = 2, 128
    loss_fn = KapaoLoss(model_k2, Hyp(), imgsz)
    # P3 (stride 8, 16x16 grid) anchor 0 = 19x27 px; centre (3.5, 5.5) cells: middle of a cell, no neighbours
    cx, cy, w, h = 3.5 * 8 / imgsz, 5.5 * 8 / imgsz, 19 / imgsz, 27 / imgsz
    kp0 = (3 * 8 / imgsz, 5 * 8 / imgsz, 2)  # the cell's corner: predicted exactly
    kp1 = ((3 + 0.3) * 8 / imgsz, (5 + 0.4) * 8 / imgsz, 1)  # 0.5 grid units away
    t = torch.tensor([_target(k, 0, cx, cy, w, h, [(0, *kp0), (1, *kp1)])])
    levels = assign_targets(t, [(16, 16), (8, 8), (4, 4), (2, 2)], loss_fn.anchors, k)
    # P3 anchors 19x27, 44x40, 38x94 all within ratio 4 of 19x27 (94/27 = 3.5); P4's smallest, 96x68, not
    assert [len(lv) for lv in levels] == [3, 0, 0, 0]
    p3 = levels[0]
    assert p3.anchor.tolist() == [0, 1, 2] and p3.gi.tolist() == [3] * 3 and p3.gj.tolist() == [5] * 3

    raw = _zeros_raw(k)
    total, comp = loss_fn(raw, t)
    g = loss_fn.gains
    # box: mean of 1 - CIoU; the prediction for anchor 0 is exactly the target
    pbox = torch.cat((torch.full((3, 2), 0.5), p3.anchor_wh), 1)
    ciou = bbox_iou(pbox, p3.box, CIoU=True).squeeze(-1)
    assert ciou[0].item() == pytest.approx(1.0, abs=1e-6) and (ciou[1:] < 0.9).all()
    assert comp[0].item() == pytest.approx(g.box * (1 - ciou).mean().item(), rel=1e-5)
    # keypoints: mean distance over the 3 x 2 visible keypoints: 0 for kp0, 0.5 grid units for kp1
    assert comp[3].item() == pytest.approx(g.kp * 0.25, rel=1e-5)
    # classes: BCE(0, one-hot) = log 2 for every element, on each level with positives
    assert comp[2].item() == pytest.approx(g.cls * math.log(2), rel=1e-5)
    # objectness: BCE(0, t) = log 2 whatever the target, weighted per level
    assert comp[1].item() == pytest.approx(g.obj * math.log(2) * sum(OBJ_LEVEL_WEIGHTS), rel=1e-5)
    assert total.item() == pytest.approx(comp.sum().item(), rel=1e-6)  # batch size 1


def test_loss_scales_with_batch_and_keypoint_objects_have_no_kp_loss(model_k2):
    k = 2
    loss_fn = KapaoLoss(model_k2, Hyp(), 128)
    t = torch.tensor([_target(k, 1, 0.3, 0.3, 0.15, 0.15), _target(k, 2, 0.6, 0.2, 0.15, 0.15, image=1)])
    total, comp = loss_fn(_zeros_raw(k, b=2), t)
    assert comp[0] > 0 and comp[2] > 0 and comp[3] == 0  # keypoint objects: box and class, no keypoints
    assert total.item() == pytest.approx(2 * comp.sum().item(), rel=1e-6)


def test_loss_empty_targets(model_k2):
    k = 2
    loss_fn = KapaoLoss(model_k2, Hyp(), 128)
    raw = _zeros_raw(k, b=2, requires_grad=True)
    total, comp = loss_fn(raw, torch.zeros(0, TargetLayout(k).width))
    assert comp[[0, 2, 3]].tolist() == [0.0, 0.0, 0.0] and comp[1] > 0 and torch.isfinite(total)
    total.backward()
    assert all(r.grad[..., HeadLayout(k).obj].abs().sum() > 0 for r in raw)


def test_loss_does_not_mutate_inputs(model_k2):
    k = 2
    loss_fn = KapaoLoss(model_k2, Hyp(), 128)
    t = torch.tensor([_target(k, 0, 0.4, 0.45, 0.3, 0.5, [(0, 0.41, 0.3, 2)])])
    raw = [torch.randn(1, 3, 128 // s, 128 // s, HeadLayout(k).num_outputs) for s in STRIDES]
    t0, raw0 = t.clone(), [r.clone() for r in raw]
    loss_fn(raw, t)
    assert torch.equal(t, t0) and all(torch.equal(a, b) for a, b in zip(raw, raw0))


def test_gradients_reach_every_output_level():
    """A keypoint-only loss with pose objects sized for each level's anchors sends gradient into all
    four output convs (and the full loss does too)."""
    torch.manual_seed(0)
    k, imgsz = 17, 256
    model = kapao_n(k).train()
    kpts = [(j, 0.5 + 0.01 * j, 0.45, 2) for j in range(k)]
    t = torch.tensor([
        _target(k, 0, 0.3, 0.3, 25 / imgsz, 35 / imgsz, kpts),  # P3/P4 anchors
        _target(k, 0, 0.6, 0.6, 120 / imgsz, 150 / imgsz, kpts),  # P4/P5
        _target(k, 0, 0.5, 0.5, 250 / imgsz, 250 / imgsz, kpts),  # P5/P6
    ])
    x = torch.rand(2, 3, imgsz, imgsz)
    kp_only = KapaoLoss(model, Hyp(box=0, obj=0, cls=0), imgsz)
    levels = assign_targets(t, [(imgsz // s, imgsz // s) for s in STRIDES], kp_only.anchors, k)
    assert all(len(lv) > 0 for lv in levels)
    total, comp = kp_only(model(x), t)
    assert comp[[0, 1, 2]].tolist() == [0.0, 0.0, 0.0] and comp[3] > 0
    total.backward()
    for i, conv in enumerate(model.head.m):
        w = conv.weight.grad.view(3, HeadLayout(k).num_outputs, -1)
        assert w[:, HeadLayout(k).kpt].abs().sum() > 0, f"no keypoint gradient at level {i}"
    model.zero_grad()
    total, _ = KapaoLoss(model, Hyp(), imgsz)(model(x), t)
    total.backward()
    assert all(conv.weight.grad.abs().sum() > 0 for conv in model.head.m)


# ---------------------------------------------------------------------------------------------
# overfit one real image
IMAGE_ID = 40083  # 500x333, two people with keypoints and a small person without


def _letterbox(img: np.ndarray, size: int) -> tuple[np.ndarray, float, int, int]:
    h, w = img.shape[:2]
    r = size / max(h, w)
    nh, nw = round(h * r), round(w * r)
    top, left = (size - nh) // 2, (size - nw) // 2
    canvas = np.full((size, size, 3), 114, np.uint8)
    canvas[top:top + nh, left:left + nw] = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
    return canvas, r, left, top


def _image_and_targets(root: Path, size: int, k: int, kp_bbox: float) -> tuple[torch.Tensor, torch.Tensor]:
    data = json.loads((root / "person_keypoints.json").read_text())
    info = next(i for i in data["images"] if i["id"] == IMAGE_ID)
    img = cv2.imread(str(root / "images" / info["file_name"]))
    assert img is not None
    canvas, r, left, top = _letterbox(img, size)
    x = torch.from_numpy(np.ascontiguousarray(canvas[..., ::-1])).permute(2, 0, 1)[None].float() / 255
    rows = []
    side = kp_bbox * size
    for a in data["annotations"]:
        if a["image_id"] != IMAGE_ID or a["iscrowd"]:
            continue
        bx, by, bw, bh = a["bbox"]
        kp = np.asarray(a["keypoints"], float).reshape(k, 3)
        kxy = kp[:, :2] * r + (left, top)
        kpts = [(j, kxy[j, 0] / size, kxy[j, 1] / size, kp[j, 2]) for j in range(k) if kp[j, 2] > 0]
        rows.append(_target(k, 0, ((bx + bw / 2) * r + left) / size, ((by + bh / 2) * r + top) / size,
                            bw * r / size, bh * r / size, kpts))
        rows += [_target(k, j + 1, x_, y_, side / size, side / size) for j, x_, y_, _ in kpts]
    return x, torch.tensor(rows, dtype=torch.float32)


@pytest.mark.slow
def test_overfit_one_image_drives_every_term_down(coco_mini: Path):
    torch.manual_seed(0)
    k, size, steps = 17, 256, 200
    model = kapao_n(k).train()
    x, t = _image_and_targets(coco_mini, size, k, model.schema.kp_bbox)
    assert (t[:, 1] == 0).sum() == 3 and (t[:, 1] > 0).sum() > 20  # 3 people + their keypoint objects
    loss_fn = KapaoLoss(model, Hyp(), size)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    history = []
    for _ in range(steps):
        total, comp = loss_fn(model(x), t)
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(comp)
    h = torch.stack(history)
    start, end = h[:5].mean(0), h[-5:].mean(0)
    assert torch.isfinite(h).all()
    for name, s, e in zip(("box", "obj", "cls", "kp"), start.tolist(), end.tolist()):
        assert e < 0.5 * s, f"{name} loss did not fall: {s:.4f} -> {e:.4f}"

    # the decoded predictions now find the people: loss encoding and decode agree
    with torch.no_grad():
        decoded = decode(model(x), model.anchors, model.strides, model.layout)[0]
    lay = model.layout
    person_score = decoded[:, lay.obj] * decoded[:, lay.cls.start]
    for gt in t[t[:, 1] == 0]:
        vis = gt[TargetLayout(k).kpt].view(k, 3)[:, 2] > 0
        if not vis.any():
            continue
        iou = bbox_iou(decoded[:, lay.box], gt[2:6][None] * size).squeeze(-1)
        best = torch.argmax(person_score * (iou > 0.7))
        assert person_score[best] > 0.5 and iou[best] > 0.7
        pred_kp = decoded[best, lay.kpt].view(k, 2)
        gt_kp = gt[TargetLayout(k).kpt].view(k, 3)[:, :2] * size
        assert (pred_kp[vis] - gt_kp[vis]).norm(dim=-1).mean() < 8.0  # pixels at 256x256
