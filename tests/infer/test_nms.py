"""NMS of decoded predictions: candidate selection, the 30 000 cap, early-stopping class-wise NMS."""
from __future__ import annotations

import pytest
import torch
import torchvision

from kapao.cfg.schema import HeadLayout
from kapao.cfg.settings import PREDICT_SETTINGS, VAL_SETTINGS, InferenceSettings
from kapao.infer.nms import Detections, nms, xywh_to_xyxy

# ----------------------------------------------------------------------------------------------
# NMS

K = 2
L = HeadLayout(K)


def _anchor(cx, cy, w, h, obj, classes, kps=None):
    """One prediction row: classes is a list of 1 + K class probabilities."""
    row = torch.zeros(L.num_outputs)
    row[L.box] = torch.tensor([cx, cy, w, h])
    row[L.obj] = obj
    row[L.cls] = torch.tensor(classes, dtype=torch.float32)
    row[L.kpt] = torch.tensor(kps if kps is not None else [cx - 1, cy - 1, cx + 1, cy + 1], dtype=torch.float32)
    return row


def _pred(*rows):
    return torch.stack(rows)[None]


def test_nms_suppresses_overlapping_persons_and_keeps_their_keypoints():
    pred = _pred(
        _anchor(50, 50, 40, 80, 0.9, [1.0, 0.0, 0.0], [40, 30, 60, 30]),
        _anchor(52, 51, 40, 80, 0.8, [1.0, 0.0, 0.0]),  # overlaps the first heavily
        _anchor(200, 50, 40, 80, 0.95, [0.5, 0.0, 0.0], [190, 30, 210, 31]),  # separate person, score 0.475
    )
    (d,) = nms(pred, PREDICT_SETTINGS.replace(conf=0.3), L)
    assert isinstance(d, Detections)
    assert d.scores.tolist() == pytest.approx([0.9, 0.475])
    assert torch.allclose(d.boxes, torch.tensor([[30.0, 10.0, 70.0, 90.0], [180.0, 10.0, 220.0, 90.0]]))
    assert d.keypoints.tolist() == [[[40, 30], [60, 30]], [[190, 30], [210, 31]]]
    assert d.kp_objects.shape == (0, 6)


def test_nms_keypoint_classes_are_independent():
    box = (100, 100, 10, 10)
    pred = _pred(
        _anchor(*box, 0.9, [0.0, 1.0, 0.0]),  # keypoint 0
        _anchor(*box, 0.8, [0.0, 0.0, 1.0]),  # keypoint 1, same box: kept
        _anchor(101, 100, 10, 10, 0.7, [0.0, 1.0, 0.0]),  # keypoint 0 again, overlapping: suppressed
        _anchor(*box, 0.95, [1.0, 0.0, 0.0]),  # a person at the same place does not suppress them
    )
    (d,) = nms(pred, PREDICT_SETTINGS, L)
    assert d.kp_objects[:, 4].tolist() == pytest.approx([0.9, 0.8])
    assert d.kp_objects[:, 5].tolist() == [0.0, 1.0]  # keypoint index 0..K-1
    assert torch.equal(d.kp_objects[:, :4], torch.tensor([[95.0, 95, 105, 105]] * 2))
    assert d.scores.tolist() == pytest.approx([0.95])


def test_nms_one_class_per_anchor_and_strict_thresholds():
    s = InferenceSettings(conf=0.5, iou=0.45, conf_kp=0.5, iou_kp=0.45)
    pred = _pred(
        _anchor(50, 50, 20, 20, 1.0, [0.8, 0.9, 0.0]),  # argmax is keypoint 0: not a person
        _anchor(150, 50, 20, 20, 1.0, [0.5, 0.0, 0.0]),  # person score exactly conf: dropped
        _anchor(250, 50, 20, 20, 0.5, [1.0, 0.0, 0.0]),  # objectness exactly conf: dropped
        _anchor(350, 50, 20, 20, 1.0, [0.0, 0.0, 0.5]),  # keypoint score exactly conf_kp: dropped
        _anchor(450, 50, 20, 20, 0.75, [0.9, 0.0, 0.0]),  # person 0.675: kept
        _anchor(550, 50, 20, 20, 0.75, [0.5, 0.5, 0.0]),  # tie person/keypoint: argmax takes the person
    )
    (d,) = nms(pred, s, L)
    assert d.scores.tolist() == pytest.approx([0.675])
    assert d.kp_objects[:, 4:].tolist() == [[pytest.approx(0.9), 0.0]]
    (d,) = nms(pred, s.replace(conf=0.3), L)
    assert d.scores.tolist() == pytest.approx([0.675, 0.5, 0.5, 0.375])


def test_nms_max_det_per_image_and_batch_independence():
    rows = [_anchor(30 * i + 10, 10, 10, 10, 0.5 + 0.04 * i, [1.0, 0.0, 0.0]) for i in range(10)]
    rows += [_anchor(30 * i + 10, 100, 10, 10, 0.5 + 0.04 * i, [0.0, 1.0, 0.0]) for i in range(10)]
    one = torch.stack(rows)
    pred = torch.stack((one, one, torch.zeros_like(one)))  # identical images 0 and 1, empty image 2
    s = VAL_SETTINGS.replace(max_det=3)
    dets = nms(pred, s, L)
    assert len(dets) == 3
    for d in dets[:2]:  # no suppression across images; max_det per image, best first
        assert d.scores.tolist() == pytest.approx([0.86, 0.82, 0.78])
        assert d.kp_objects[:, 4].tolist() == pytest.approx([0.86, 0.82, 0.78])
    assert len(dets[2].scores) == 0 and dets[2].kp_objects.shape == (0, 6) and dets[2].keypoints.shape == (0, K, 2)


def test_nms_matches_per_image_torchvision_reference_on_random_predictions():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        b, n = 3, 400
        pred = torch.rand(b, n, L.num_outputs, generator=g)
        pred[..., :2] *= 320
        pred[..., 2:4] = pred[..., 2:4] * 60 + 2
        pred[..., L.kpt] *= 320
        s = VAL_SETTINGS.replace(max_det=50 + trial)
        dets = nms(pred, s, L)
        for i, d in enumerate(dets):
            x = pred[i]
            obj = x[:, L.obj]
            sc, cls = (x[:, L.cls] * obj[:, None]).max(1)
            boxes = xywh_to_xyxy(x[:, L.box])
            for person, conf, iou in ((True, s.conf, s.iou), (False, s.conf_kp, s.iou_kp)):
                m = (obj > conf) & (sc > conf) & ((cls == 0) if person else (cls > 0))
                keep = torchvision.ops.batched_nms(boxes[m], sc[m], cls[m], iou)[: s.max_det]
                if person:
                    assert torch.equal(d.scores, sc[m][keep]) and torch.equal(d.boxes, boxes[m][keep])
                    assert torch.equal(d.keypoints, x[m][keep][:, L.kpt].reshape(-1, K, 2))
                else:
                    assert torch.equal(d.kp_objects[:, 4], sc[m][keep]) and torch.equal(d.kp_objects[:, :4], boxes[m][keep])
                    assert torch.equal(d.kp_objects[:, 5], (cls[m][keep] - 1).float())


def test_nms_empty_and_bad_shape():
    assert nms(torch.zeros(0, 5, L.num_outputs), VAL_SETTINGS, L) == []
    (d,) = nms(torch.zeros(1, 0, L.num_outputs), VAL_SETTINGS, L)
    assert d.boxes.shape == (0, 4) and d.keypoints.shape == (0, K, 2) and d.kp_objects.shape == (0, 6)
    with pytest.raises(ValueError, match="K=2"):
        nms(torch.zeros(1, 5, L.num_outputs + 1), VAL_SETTINGS, L)


# ----------------------------------------------------------------------------------------------
# Early-stopping NMS against the previous implementation, kept in tests/infer/reference_nms.py

def _load_reference():
    from tests.infer import reference_nms

    return reference_nms


REF = _load_reference()


@pytest.fixture
def nms_calls(monkeypatch):
    """Records every postprocess.batched_nms_top call as (candidates, most candidates one NMS round saw):
    fewer seen than given = answered by a prefix (early stop)."""
    from kapao.infer import nms as pp
    calls, seen = [], []
    real_subset, real_top = pp._nms_subset, pp.batched_nms_top

    def recording_subset(boxes, *args):
        seen.append(boxes.shape[0])
        return real_subset(boxes, *args)

    def recording_top(boxes, scores, *args):
        del seen[:]
        keep = real_top(boxes, scores, *args)
        calls.append((scores.numel(), max(seen)))
        return keep

    monkeypatch.setattr(pp, "_nms_subset", recording_subset)
    monkeypatch.setattr(pp, "batched_nms_top", recording_top)
    return calls


def _early(calls):
    return sum(seen < n for n, seen in calls)


def _assert_same_detections(new, old):
    assert len(new) == len(old)
    for a, b in zip(new, old):
        for x, y in zip(a, b):
            assert x.dtype == y.dtype and torch.equal(x, y)


def _assert_same_up_to_tie_order(new, old, max_det):
    """Same score sequence; every group of exactly equal scores holds the same rows, except the last
    group when max_det cut it (torchvision's unstable sort picked some of its rows, we the first)."""
    assert len(new) == len(old)
    for a, b in zip(new, old):
        for rows_a, rows_b in ((torch.cat((a.boxes, a.scores[:, None], a.keypoints.flatten(1)), 1),
                                torch.cat((b.boxes, b.scores[:, None], b.keypoints.flatten(1)), 1)),
                               (a.kp_objects, b.kp_objects)):
            s = rows_a[:, 4]
            assert torch.equal(s, rows_b[:, 4])
            for v in torch.unique(s):
                if len(s) == max_det and v == s[-1]:
                    continue
                group_a, group_b = rows_a[s == v], rows_b[s == v]
                assert torch.equal(torch.unique(group_a, dim=0), torch.unique(group_b, dim=0))


def _tied_pred(g, b, n, layout, ties, width=640.0):
    """Random decoded predictions; with `ties`, objectness, class probabilities and boxes come from
    coarse grids, so scores and IoUs tie exactly and often."""
    pred = torch.rand(b, n, layout.num_outputs, generator=g)
    if ties:
        pred[..., layout.obj] = 0.5 + torch.randint(0, 3, (b, n), generator=g) / 4
        pred[..., layout.cls] = torch.randint(1, 9, (b, n, layout.num_classes), generator=g) / 8
        pred[..., :4] = torch.randint(0, 16, (b, n, 4), generator=g).float()
    pred[..., :2] *= width / pred[..., :2].max()
    pred[..., 2:4] = pred[..., 2:4] * 40 + 4
    pred[..., layout.kpt] *= width
    return pred


@pytest.mark.parametrize("ties", [False, True])
def test_nms_early_stop_equals_previous_implementation_on_random_inputs(ties, nms_calls):
    """Distinct scores: identical to the previous NMS. Many exact ties: identical up to their order."""
    layout = HeadLayout(3)
    g = torch.Generator().manual_seed(1 + ties)
    exact = 0
    for trial, max_det in enumerate((1, 3, 40, 300, 5000)):
        pred = _tied_pred(g, 2, 3000 + 500 * trial, layout, ties)
        for settings in (VAL_SETTINGS.replace(max_det=max_det, conf_kp=0.05),
                         PREDICT_SETTINGS.replace(max_det=max_det, conf=0.2, conf_kp=0.2, iou=0.3)):
            new, old = nms(pred, settings, layout), REF.nms(pred, settings, layout)
            _assert_same_up_to_tie_order(new, old, max_det)
            distinct = all(bool((s[1:] < s[:-1]).all()) for d in old for s in (d.scores, d.kp_objects[:, 4]))
            if distinct and not ties:  # no equal scores kept (nor at the max_det cut): bitwise the previous result
                _assert_same_detections(new, old)
                exact += 1
    assert exact >= (0 if ties else 6)
    assert _early(nms_calls) >= 8  # the prefixes answered calls (max_det <= 40 at least)


def test_nms_early_stop_batch_and_images_without_candidates():
    layout = HeadLayout(2)
    g = torch.Generator().manual_seed(5)
    pred = _tied_pred(g, 4, 3000, layout, ties=False)
    pred[1, :, layout.obj] = 0.0  # an image with no candidates between busy ones
    settings = VAL_SETTINGS.replace(max_det=7)
    _assert_same_detections(nms(pred, settings, layout), REF.nms(pred, settings, layout))


def _hot_pred_from_raw(model, imgsz, batch, seed):
    """Decoded output of the hot network's head at imgsz x imgsz, from random logits around the hot biases
    (the input shape of a 1280 frame without running the backbone)."""
    from kapao.models.network import decode

    g = torch.Generator().manual_seed(seed)
    head, layout = model.head, model.layout
    raw = []
    for stride in model.strides:
        n = imgsz // stride
        logits = torch.randn(batch, head.na, n, n, head.no, generator=g) * 0.5
        logits[..., layout.obj] += 2.0
        raw.append(logits)
    return decode(raw, model.anchors, model.strides, layout)


@pytest.mark.parametrize("settings", [PREDICT_SETTINGS.replace(conf=0.3, conf_kp=0.3), VAL_SETTINGS],
                         ids=["conf0.3", "val"])
def test_nms_early_stop_equals_previous_on_hot_1280_output(settings, nms_calls):
    from kapao.models.network import build_model

    model = build_model("n")
    pred = _hot_pred_from_raw(model, 1280, 1, seed=0)
    assert pred.shape[1] == 3 * sum((1280 // s) ** 2 for s in model.strides)
    new = nms(pred, settings, model.layout)
    _assert_same_detections(new, REF.nms(pred, settings, model.layout))
    (d,) = new
    assert len(d.scores) == len(d.kp_objects) == settings.max_det
    assert _early(nms_calls) == 2  # persons and keypoint objects both answered by a prefix


def test_nms_early_stop_equals_previous_on_hot_model(nms_calls):
    """A real network with the hot biases: its scores differ by a few ulps at most, so exact ties abound."""
    from kapao.models.network import build_model

    torch.manual_seed(0)
    model = REF.set_hot_biases(build_model("n").eval())
    x = torch.rand(2, 3, 256, 320, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        pred = model(x)[0]
    for settings in (PREDICT_SETTINGS.replace(conf=0.3, conf_kp=0.3), VAL_SETTINGS, VAL_SETTINGS.replace(max_det=2)):
        old = REF.nms(pred, settings, model.layout)
        _assert_same_up_to_tie_order(nms(pred, settings, model.layout), old, settings.max_det)
        assert all(len(d.scores) == len(d.kp_objects) == settings.max_det for d in old)  # hot: every image is full
    assert _early(nms_calls) >= 6  # keypoint objects of 2 images x 3 settings


def _int_boxes(g, n, classes):
    xy = torch.randint(0, 60, (n, 2), generator=g).float() * 10
    boxes = torch.cat((xy, xy + torch.randint(5, 40, (n, 2), generator=g)), 1)
    return boxes, torch.randint(1, 50, (n,), generator=g) / 50, torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("max_det", [1, 5, 300])
def test_batched_nms_top_coordinate_trick_path(max_det, monkeypatch):
    """torchvision's single-NMS path (taken on CUDA below its threshold) with a prefix, forced on CPU."""
    from torchvision.ops.boxes import _batched_nms_coordinate_trick

    from kapao.infer import nms as pp
    monkeypatch.setitem(pp._TV_VANILLA_NUMEL, "cpu", 10**12)
    g = torch.Generator().manual_seed(max_det)
    for _ in range(4):
        boxes, scores, classes = _int_boxes(g, 3000, 4)
        want = _batched_nms_coordinate_trick(boxes, scores, classes, 0.45)[:max_det]
        assert torch.equal(pp.batched_nms_top(boxes, scores, classes, 0.45, max_det), want)


@pytest.mark.parametrize("max_det", [1, 5, 300, 4000])
def test_batched_nms_top_per_class_path_takes_ties_in_input_order(max_det):
    """On CPU above 1000 boxes torchvision runs NMS per class and sorts the kept boxes unstably; on
    integer boxes (exact arithmetic, so its class shift changes no decision) its stable single-NMS
    path gives the same decisions with ties in input order: batched_nms_top must equal it."""
    from torchvision.ops.boxes import _batched_nms_coordinate_trick

    from kapao.infer.nms import batched_nms_top

    g = torch.Generator().manual_seed(max_det)
    for _ in range(3):
        boxes, scores, classes = _int_boxes(g, 3000, 5)
        assert boxes.numel() > 4000  # torchvision's per-class path
        want = _batched_nms_coordinate_trick(boxes, scores, classes, 0.45)[:max_det]
        full = torchvision.ops.batched_nms(boxes, scores, classes, 0.45)[:max_det]
        assert torch.equal(scores[full], scores[want])  # torchvision's two paths agree up to tie order
        assert torch.equal(batched_nms_top(boxes, scores, classes, 0.45, max_det), want)


@pytest.mark.parametrize("levels", [1, 3])
def test_batched_nms_top_cuts_prefixes_inside_groups_of_equal_scores(levels, monkeypatch):
    """A saturated network ties thousands of scores exactly: the prefixes must cut inside a tie group
    (in input order), still answer early, and still equal torchvision's stable path."""
    from torchvision.ops.boxes import _batched_nms_coordinate_trick

    from kapao.infer import nms as nms_module
    seen = []
    real = nms_module._nms_subset
    monkeypatch.setattr(nms_module, "_nms_subset", lambda b, *a: seen.append(len(b)) or real(b, *a))
    g = torch.Generator().manual_seed(levels)
    boxes, _, classes = _int_boxes(g, 6000, 2)
    scores = (torch.randint(0, levels, (6000,), generator=g) + 1) / 4
    for max_det in (1, 50, 300):
        seen.clear()
        want = _batched_nms_coordinate_trick(boxes, scores, classes, 0.45)[:max_det]
        assert torch.equal(nms_module.batched_nms_top(boxes, scores, classes, 0.45, max_det), want)
        assert max(seen) < 6000  # answered by a prefix, though every prefix cuts a tie group

def test_torchvision_path_thresholds_are_the_ones_followed():
    """batched_nms_top follows torchvision's choice between its two batched NMS paths; fail loudly if a
    torchvision release moves the thresholds (pytorch/vision#8925 raised the CUDA one)."""
    import inspect

    from kapao.infer.nms import _TV_VANILLA_NUMEL

    src = inspect.getsource(torchvision.ops.boxes.batched_nms).replace("_", "")
    assert f'boxes.numel() > ({_TV_VANILLA_NUMEL["cpu"]} if boxes.device.type == "cpu" else ' \
           f'{_TV_VANILLA_NUMEL["cuda"]})' in src


def _stable_top(scores, k):
    return torch.sort(torch.sort(scores, descending=True, stable=True).indices[:k]).values


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_top_candidates_is_the_stable_sort_prefix(dtype):
    """The k highest scores, exactly equal scores at the cut taken in index order (bfloat16 takes the
    torch.topk path that CUDA and MPS tensors take)."""
    from kapao.infer.nms import top_candidates

    g = torch.Generator().manual_seed(7)
    for n, k, levels in ((1000, 100, 8), (5000, 3000, 3), (64, 64, 2), (10, 20, 5), (0, 5, 1), (3000, 1, 1000), (2000, 999, 0)):
        scores = (torch.randint(0, levels, (n,), generator=g) / max(levels, 1) if levels
                  else torch.rand(n, generator=g)).to(dtype)
        scores[:: 17] = float("-inf")
        got = top_candidates(scores, k)
        assert torch.equal(got, _stable_top(scores, k)) and len(got) == min(n, k)


def test_the_inference_path_does_not_import_the_torchvision_package():
    """NMS loads only torchvision's compiled kernel: the package import (torchvision.models, torch._dynamo)
    costs seconds of start-up. Checked in a fresh interpreter, after one NMS call."""
    import subprocess
    import sys

    code = ("import sys, torch; from kapao.infer.predictor import KAPAO; from kapao.infer.nms import batched_nms_top; "
            "b = torch.tensor([[0., 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]]); "
            "k = batched_nms_top(b, torch.tensor([.9, .8, .7]), torch.zeros(3, dtype=torch.long), .5, 10); "
            "print(k.tolist(), 'torchvision' in sys.modules, 'torchvision.ops' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[0,", "2]", "False", "False"]
