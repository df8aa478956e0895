"""COCO and CrowdPose keypoint metrics (kapao.eval.metrics) on the real mini datasets and hand-built cases."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from kapao.cfg.dataset import load_dataset_config
from kapao.errors import ConfigError, DataError
from kapao.eval.metrics import (
    COCO_METRICS,
    CROWDPOSE_METRICS,
    CrowdPoseEval,
    evaluate,
    evaluate_coco,
    evaluate_crowdpose,
    format_metrics,
    save_results,
    sort_results,
)

# crowdpose-api/PythonAPI/crowdposetools/cocoeval.py, computeOks (hard-coded there)
OFFICIAL_CROWDPOSE_SIGMAS = np.array([.79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89, .79, .79]) / 10.0
COCO_SIGMAS = np.array([.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89]) / 10.0


def _quiet():
    return contextlib.redirect_stdout(io.StringIO())


def _gt_results(ann_file: Path, jitter: float = 0.0, seed: int = 0, images=None) -> list[dict]:
    """Ground-truth persons with labelled keypoints as predictions (confidence 1 where labelled).

    Jitter moves keypoint k of person i by jitter * z[i, k] pixels, with z fixed by `seed`, so a
    larger jitter moves every keypoint further in the same direction. Scores are distinct so that
    the ranking is the same at every jitter level.
    """
    data = json.loads(ann_file.read_text())
    rng = np.random.default_rng(seed)
    out = []
    for i, a in enumerate(data["annotations"]):
        kp = np.asarray(a["keypoints"], dtype=float).reshape(-1, 3)
        z = rng.standard_normal((len(kp), 2))
        if (kp[:, 2] > 0).sum() == 0 or (images is not None and a["image_id"] not in images):
            continue
        xy = kp[:, :2] + jitter * z
        conf = (kp[:, 2] > 0).astype(float)  # GT v is 0/1/2; a prediction's third value is a confidence
        out.append({"image_id": a["image_id"], "category_id": 1,
                    "keypoints": np.column_stack([xy, conf]).ravel().tolist(),
                    "score": round(1.0 - 0.01 * i, 3), "bbox": list(a["bbox"])})
    return out


def _pycocotools_stats(ann_file: Path, results: list[dict], sigmas) -> tuple[np.ndarray, str]:
    """Plain pycocotools COCOeval, as the official COCO keypoint evaluation runs it, and its printout."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        gt = COCO(str(ann_file))
        ev = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), "keypoints")
        ev.params.kpt_oks_sigmas = np.asarray(sigmas)
        ev.evaluate()
        ev.accumulate()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        ev.summarize()
    return ev.stats, buf.getvalue()


@pytest.fixture(scope="module")
def coco_json(coco_mini: Path) -> Path:
    return coco_mini / "person_keypoints.json"


@pytest.fixture(scope="module")
def crowd_json(crowdpose_mini: Path) -> Path:
    return crowdpose_mini / "crowdpose.json"


# ----------------------------------------------------------------------------------------------
def test_builtin_crowdpose_sigmas_are_the_official_ones() -> None:
    schema = load_dataset_config("crowdpose").schema
    np.testing.assert_allclose(schema.sigmas, OFFICIAL_CROWDPOSE_SIGMAS, rtol=0, atol=1e-12)
    np.testing.assert_allclose(load_dataset_config("coco").schema.sigmas, COCO_SIGMAS, rtol=0, atol=1e-12)


def test_coco_ground_truth_as_predictions_is_perfect(coco_json: Path) -> None:
    res = _gt_results(coco_json)
    assert len(res) == 12  # 14 persons, 2 without labelled keypoints
    m = evaluate_coco(coco_json, res, COCO_SIGMAS)
    assert tuple(m) == COCO_METRICS
    for k in ("AP", "AP50", "AP75", "AR", "AR50", "AR75"):
        assert m[k] == 1.0, k
    for k in ("APm", "APl", "ARm", "ARl"):
        assert m[k] in (1.0, -1.0), k


def test_crowdpose_ground_truth_as_predictions_is_perfect(crowd_json: Path) -> None:
    res = _gt_results(crowd_json)
    assert len(res) == 4  # 5 persons, 1 without labelled keypoints
    m = evaluate_crowdpose(crowd_json, res, OFFICIAL_CROWDPOSE_SIGMAS)
    assert tuple(m) == CROWDPOSE_METRICS
    for k in ("AP", "AP50", "AP75", "AR", "AR50", "AR75", "AP_medium"):
        assert m[k] == 1.0, k
    # crowdIndex 0.33 and 0.39: both images are 'medium'; the official tool prints -1 for an empty subset
    assert m["AP_easy"] == -1.0 and m["AP_hard"] == -1.0


@pytest.mark.parametrize("protocol, levels", [("coco", (2, 4, 8, 16)), ("crowdpose", (4, 8, 16, 24))])
def test_jitter_lowers_ap_strictly(protocol: str, levels: tuple[int, ...], coco_json: Path, crowd_json: Path) -> None:
    ann = coco_json if protocol == "coco" else crowd_json
    schema = load_dataset_config(protocol).schema  # built-in config of the same name
    aps = [evaluate(ann, _gt_results(ann, jitter=j, seed=3), schema, protocol)["AP"] for j in levels]
    assert all(0.0 < ap < 1.0 for ap in aps), aps
    assert all(a > b for a, b in zip(aps, aps[1:])), aps


@pytest.mark.parametrize("protocol", ["coco", "crowdpose"])
def test_keypoint_confidences_do_not_change_the_metrics(protocol: str, coco_json: Path, crowd_json: Path) -> None:
    """OKS ignores keypoint scores: the per-keypoint confidences of unfused keypoints (0 before, the
    keypoint-class evidence now) leave every metric exactly as it was."""
    ann = coco_json if protocol == "coco" else crowd_json
    schema = load_dataset_config(protocol).schema
    old = _gt_results(ann, jitter=6, seed=5)
    rng = np.random.default_rng(0)
    new = copy.deepcopy(old)
    for r in new:
        kp = np.asarray(r["keypoints"]).reshape(-1, 3)
        fused = rng.random(len(kp)) < 0.5  # "fused" keypoints keep their score, the others get one
        kp[:, 2] = np.where(fused, kp[:, 2], rng.random(len(kp)))
        r["keypoints"] = kp.ravel().tolist()
    assert new != old
    before = evaluate(ann, old, schema, protocol)
    assert 0.0 < before["AP"] < 1.0
    assert evaluate(ann, new, schema, protocol) == before


def test_coco_numbers_and_printout_are_pycocotools_own(coco_json: Path) -> None:
    res = _gt_results(coco_json, jitter=5, seed=1)
    m = evaluate_coco(coco_json, res, COCO_SIGMAS)
    stats, printed = _pycocotools_stats(coco_json, res, COCO_SIGMAS)
    assert 0 < m["AP"] < 1
    assert [m[k] for k in COCO_METRICS] == stats.tolist()
    assert format_metrics(m) == printed.rstrip("\n")


# ----------------------------------------------------------------------------------------------
# A hand-checked CrowdPose case: subsets, the 0.53 area rule, the ignore and crowd rules
K = 14
TEMPLATE = [(20 + 5 * k, 10 + 13 * k) for k in range(K)]  # inside a 100 x 200 box
AREA = 0.53 * 100 * 200  # crowdpose-api: OKS scale of a GT person = 0.53 * w * h of its GT box


def _person(ann_id: int, image_id: int, ox: float, **extra) -> dict:
    kpts = [v for x, y in TEMPLATE for v in (ox + x, y, 2)]
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0, "num_keypoints": K,
            "keypoints": kpts, "bbox": [ox, 0, 100, 200], **extra}


def _pred(image_id: int, ox: float, score: float, oks: float = 1.0) -> dict:
    """A prediction of the template person at x offset `ox` whose OKS with it is exactly `oks`:
    keypoint k moves right by d_k with exp(-d_k^2 / (2 * AREA * (2 sigma_k)^2)) = oks for every k."""
    d = 2 * OFFICIAL_CROWDPOSE_SIGMAS * math.sqrt(2 * AREA * -math.log(oks))
    kpts = [v for (x, y), dk in zip(TEMPLATE, d) for v in (ox + x + dk, y, 1.0)]
    return {"image_id": image_id, "category_id": 1, "keypoints": kpts, "score": score}


@pytest.fixture
def hand_case(tmp_path: Path) -> tuple[Path, list[dict]]:
    gt = {
        "images": [{"id": 1, "file_name": "1.jpg", "width": 900, "height": 300, "crowdIndex": 0.19},  # easy
                   {"id": 2, "file_name": "2.jpg", "width": 900, "height": 300, "crowdIndex": 0.2},  # medium
                   {"id": 3, "file_name": "3.jpg", "width": 900, "height": 300, "crowdIndex": 0.8}],  # hard
        "categories": [{"id": 1, "name": "person"}],
        "annotations": [
            # a stored area is not used: the OKS scale is 0.53 * w * h (10600), not 20000
            _person(11, 1, 0, area=20000.0),
            _person(21, 2, 0), _person(22, 2, 300),
            _person(31, 3, 0), _person(32, 3, 300, iscrowd=1),
            {"id": 33, "image_id": 3, "category_id": 1, "iscrowd": 0, "num_keypoints": 0,
             "keypoints": [0] * (3 * K), "bbox": [600, 0, 50, 50]},
        ],
    }
    path = tmp_path / "hand.json"
    path.write_text(json.dumps(gt))
    preds = [
        _pred(1, 0, 0.7, oks=0.72),  # matched at IoU thresholds 0.50..0.70, not at 0.75..0.95
        _pred(2, 0, 0.9), _pred(2, 300, 0.8, oks=0.62),  # the second matched at 0.50..0.60 only
        _pred(3, 0, 0.5), _pred(3, 300, 0.95), _pred(3, 300, 0.85),  # two on the crowd person: ignored
    ]
    return path, preds


def test_crowdpose_oks_uses_053_of_gt_box_area(hand_case) -> None:
    path, preds = hand_case
    with _quiet():
        gt = COCO(str(path))
        ev = CrowdPoseEval(gt, gt.loadRes(copy.deepcopy(preds)), OFFICIAL_CROWDPOSE_SIGMAS)
        ev.evaluate()
    assert ev.ious[(1, 1)].shape == (1, 1)
    assert ev.ious[(1, 1)][0, 0] == pytest.approx(0.72, abs=1e-9)
    # with the file's area (20000) the same prediction would have OKS 0.72 ** 0.53 = 0.84 (matched up to 0.80)
    assert 0.72 ** 0.53 > 0.8


def test_crowdpose_hand_checked_subsets_and_rules(hand_case) -> None:
    path, preds = hand_case
    m = evaluate_crowdpose(path, preds, OFFICIAL_CROWDPOSE_SIGMAS)
    # easy (image 1): a TP at 5 of the 10 thresholds, nothing at the other 5
    assert m["AP_easy"] == 0.5
    # medium (image 2, crowdIndex 0.2): 2 TPs at 3 thresholds; at 7 thresholds TP then FP, precision 1
    # up to recall 0.5 (51 of 101 recall points): (3 + 7 * 51 / 101) / 10, rounded to 4 decimals
    assert m["AP_medium"] == round((3 + 7 * 51 / 101) / 10, 4) == 0.6535
    # hard (image 3, crowdIndex 0.8): crowd and zero-keypoint persons ignored, the two predictions on
    # the crowd person (which may match more than once) are ignored, not false positives
    assert m["AP_hard"] == 1.0
    # all images: 4 persons count; thresholds 0.50-0.60 recall 4/4, 0.65-0.70 3/4, 0.75-0.95 2/4
    assert m["AP50"] == 1.0 and m["AR50"] == 1.0
    assert m["AR75"] == 0.5
    assert m["AR"] == pytest.approx((3 * 1 + 2 * 0.75 + 5 * 0.5) / 10)
    # at 0.75: scores 0.9 TP, 0.8 FP, 0.7 FP, 0.5 TP -> precision 1 to recall 0.25, 0.5 to recall 0.5
    assert m["AP75"] == pytest.approx((26 * 1.0 + 25 * 0.5) / 101)


def test_crowdpose_subset_ap_keeps_minus_one_entries(tmp_path: Path) -> None:
    # The official subset AP is the mean of precision[:, :, :, 0, :] with the -1 entries kept (the
    # main AP drops them). With a second, empty category its -1 slice halves the perfect subset AP:
    # (1 + -1) / 2 = 0. An easy image with only a zero-keypoint (ignored) person is all -1: prints -1.
    gt = {"images": [{"id": 1, "width": 10, "height": 10, "crowdIndex": 0.0},
                     {"id": 2, "width": 10, "height": 10, "crowdIndex": 0.5}],
          "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "unused"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "num_keypoints": 0,
                           "keypoints": [0] * 42, "bbox": [0, 0, 5, 5]}, _person(2, 2, 0)]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    m = evaluate_crowdpose(path, [_pred(2, 0, 0.9)], OFFICIAL_CROWDPOSE_SIGMAS)
    assert m["AP"] == pytest.approx(1.0) and m["AR"] == 1.0  # pycocotools: precision 1 / (1 + eps) for 1 TP
    assert m["AP_medium"] == 0.0
    assert m["AP_easy"] == -1.0 and m["AP_hard"] == -1.0


def test_crowdpose_needs_crowd_index(tmp_path: Path) -> None:
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": [{"id": 1}], "categories": [{"id": 1, "name": "person"}],
                                "annotations": [_person(1, 1, 0)]}))
    with pytest.raises(DataError, match="crowdIndex"):
        evaluate_crowdpose(path, [], OFFICIAL_CROWDPOSE_SIGMAS)


# ----------------------------------------------------------------------------------------------
def test_zero_predictions_give_zero(coco_json: Path, crowd_json: Path) -> None:
    m = evaluate_coco(coco_json, [], COCO_SIGMAS)
    assert m["AP"] == 0.0 and m["AR"] == 0.0 and set(m.values()) <= {0.0, -1.0}
    c = evaluate_crowdpose(crowd_json, [], OFFICIAL_CROWDPOSE_SIGMAS)
    assert c["AP"] == 0.0 and c["AR"] == 0.0 and c["AP_medium"] == 0.0
    assert c["AP_easy"] == -1.0 and c["AP_hard"] == -1.0


def test_predictions_for_some_images_only(coco_json: Path, crowd_json: Path) -> None:
    # coco-mini: images 785 (1 labelled person) and 40083 (2) of 12 labelled persons
    m = evaluate_coco(coco_json, _gt_results(coco_json, images={785, 40083}), COCO_SIGMAS)
    assert m["AR"] == 0.25 and m["AR50"] == 0.25
    assert m["AP"] == pytest.approx(26 / 101)  # precision 1 at the recall points 0.00 .. 0.25
    # crowdpose-mini: image 103319 holds 2 of the 4 persons that count
    c = evaluate_crowdpose(crowd_json, _gt_results(crowd_json, images={103319}), OFFICIAL_CROWDPOSE_SIGMAS)
    assert c["AR"] == 0.5 and c["AP"] == pytest.approx(51 / 101) and c["AP_medium"] == round(51 / 101, 4)


def test_image_ids_restrict_the_evaluation(coco_json: Path, crowd_json: Path) -> None:
    some = [785, 40083]
    assert evaluate_coco(coco_json, _gt_results(coco_json, images=set(some)), COCO_SIGMAS, image_ids=some)["AP"] == 1.0
    # predictions for other images are not counted
    assert evaluate_coco(coco_json, _gt_results(coco_json, jitter=30), COCO_SIGMAS, image_ids=some) == \
        evaluate_coco(coco_json, _gt_results(coco_json, jitter=30, images=set(some)), COCO_SIGMAS, image_ids=some)
    c = evaluate_crowdpose(crowd_json, _gt_results(crowd_json, images={103319}), OFFICIAL_CROWDPOSE_SIGMAS,
                           image_ids=[103319])
    assert c["AP"] == 1.0 and c["AP_medium"] == 1.0
    with pytest.raises(DataError, match="not in the ground truth"):
        evaluate_coco(coco_json, [], COCO_SIGMAS, image_ids=[123456789])


def _tie_case(tmp_path: Path) -> tuple[Path, list[dict]]:
    """Two overlapping persons and two predictions with equal scores whose input order decides the
    matching in pycocotools: a = exactly P1 (OKS with P2 0.32); b has OKS 0.88 with P1 and 0.61 with P2."""
    pts = [(10, 10), (20, 10), (10, 20)]
    def kp(dx, v=2):
        return [c for x, y in pts for c in (x + dx, y, v)]
    gt = {"images": [{"id": 1, "width": 200, "height": 200}], "categories": [{"id": 1, "name": "person"}],
          "annotations": [{"id": i + 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "num_keypoints": 3,
                           "area": 10000.0, "bbox": [dx, 0, 100, 100], "keypoints": kp(dx)}
                          for i, dx in enumerate((0, 30))]}
    path = tmp_path / "tie.json"
    path.write_text(json.dumps(gt))
    a = {"image_id": 1, "category_id": 1, "keypoints": kp(0, 1), "score": 0.9}
    b = {"image_id": 1, "category_id": 1, "keypoints": kp(10, 1), "score": 0.9}
    return path, [a, b]


def test_results_do_not_depend_on_prediction_order(tmp_path: Path, coco_json: Path, crowd_json: Path) -> None:
    sig3 = [0.1, 0.1, 0.1]
    path, (a, b) = _tie_case(tmp_path)
    raw_ab, _ = _pycocotools_stats(path, [a, b], sig3)
    raw_ba, _ = _pycocotools_stats(path, [b, a], sig3)
    assert raw_ab[0] != raw_ba[0]  # plain pycocotools: the order of tied predictions matters
    assert evaluate_coco(path, [a, b], sig3) == evaluate_coco(path, [b, a], sig3)

    rng = np.random.default_rng(7)
    for ann, protocol, sigmas in ((coco_json, "coco", COCO_SIGMAS), (crowd_json, "crowdpose", OFFICIAL_CROWDPOSE_SIGMAS)):
        res = _gt_results(ann, jitter=6, seed=2)
        for r in res[::2]:
            r["score"] = 0.5  # ties
        ref = evaluate(ann, res, sigmas, protocol)
        for _ in range(3):
            shuffled = [res[i] for i in rng.permutation(len(res))]
            assert evaluate(ann, shuffled, sigmas, protocol) == ref


def test_saved_results_give_the_same_numbers_in_pycocotools(tmp_path: Path) -> None:
    path, (a, b) = _tie_case(tmp_path)
    a = {**a, "bbox": [10.0, 10.0, 10.0, 10.0]}  # b has none: saved with the keypoints' extent
    out = save_results([b, a], tmp_path / "run" / "results.json")
    assert [p.name for p in out.parent.iterdir()] == ["results.json"]  # no temporary file left
    saved = json.loads(out.read_text())
    assert saved == sort_results([a, b])
    assert saved[1]["bbox"] == [20.0, 10.0, 10.0, 10.0]
    with _quiet():
        gt = COCO(str(path))
        ev = COCOeval(gt, gt.loadRes(str(out)), "keypoints")
        ev.params.kpt_oks_sigmas = np.array([0.1, 0.1, 0.1])
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats.tolist() == list(evaluate_coco(path, [b, a], [0.1, 0.1, 0.1]).values())


def test_inputs_are_not_mutated(coco_json: Path) -> None:
    res = _gt_results(coco_json, jitter=3)
    before = copy.deepcopy(res)
    with _quiet():
        gt = COCO(str(coco_json))
    gt_before = copy.deepcopy(gt.dataset)
    m_obj = evaluate_coco(gt, res, COCO_SIGMAS)
    assert res == before  # pycocotools' loadRes would add id/area/segmentation to the caller's dicts
    assert gt.dataset == gt_before  # nor 'ignore' flags to the caller's ground truth
    assert m_obj == evaluate_coco(coco_json, res, COCO_SIGMAS)


def test_bad_inputs_raise_clear_errors(coco_json: Path) -> None:
    good = _gt_results(coco_json)[:1]
    with pytest.raises(DataError, match="not in the ground truth"):
        evaluate_coco(coco_json, [{**good[0], "image_id": 999999}], COCO_SIGMAS)
    with pytest.raises(DataError, match="keypoint values"):
        evaluate_coco(coco_json, [{**good[0], "keypoints": good[0]["keypoints"][:42]}], COCO_SIGMAS)
    with pytest.raises(DataError, match="annotation id 442619: 'keypoints' has 51 values, expected 42"):
        evaluate_coco(coco_json, good, OFFICIAL_CROWDPOSE_SIGMAS)  # 14 sigmas, 17 keypoints in the GT
    with pytest.raises(DataError, match="result #0"):
        evaluate_coco(coco_json, [{"image_id": 785}], COCO_SIGMAS)
    with pytest.raises(DataError, match="not found"):
        evaluate_coco(coco_json.parent / "missing.json", good, COCO_SIGMAS)
    with pytest.raises(ConfigError, match="protocol"):
        evaluate(coco_json, good, COCO_SIGMAS, "mpii")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="sigmas"):
        evaluate_coco(coco_json, good, [0.1] * 16 + [0.0])


def test_format_metrics_table(crowd_json: Path) -> None:
    m = evaluate_crowdpose(crowd_json, _gt_results(crowd_json), OFFICIAL_CROWDPOSE_SIGMAS)
    lines = format_metrics(m).splitlines()
    assert len(lines) == len(CROWDPOSE_METRICS)
    assert lines[0] == " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets= 20 ] = 1.000"
    assert lines[3] == " Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets= 20 ] = 1.000"
    assert lines[6] == " Average Precision  (AP) @[ IoU=0.50:0.95 | type=  easy | maxDets= 20 ] = -1.000"
    assert lines[7].endswith("type=medium | maxDets= 20 ] = 1.000")


def test_coco_protocol_on_annotations_without_area(crowd_json: Path) -> None:
    # a custom COCO-format file without 'area': 0.53 x box area with a warning, instead of a KeyError
    with pytest.warns(UserWarning, match="no 'area'"):
        m = evaluate_coco(crowd_json, _gt_results(crowd_json), OFFICIAL_CROWDPOSE_SIGMAS)
    assert m["AP"] == 1.0 and m["AR"] == 1.0


def _corrupted(src: Path, dst: Path, edit) -> Path:
    data = json.loads(src.read_text())
    edit(data)
    dst.write_text(json.dumps(data))
    return dst


@pytest.mark.parametrize("edit, phrase", [
    (lambda d: d["annotations"][0]["keypoints"].__setitem__(0, float("nan")), "'keypoints' holds NaN"),
    (lambda d: d["annotations"][0]["bbox"].__setitem__(2, float("inf")), "'bbox' holds NaN or infinite"),
    (lambda d: d["annotations"][0]["keypoints"].__setitem__(0, "12"), "'keypoints' must be a list of numbers"),
    (lambda d: d["annotations"][0].__setitem__("bbox", [1, 2, 3]), "'bbox' has 3 values, expected 4"),
    (lambda d: d["annotations"][0].__setitem__("area", None), "'area' must be a list of numbers"),
    (lambda d: d["annotations"][1].__setitem__("id", d["annotations"][0]["id"]), "appears twice"),
    (lambda d: d["images"][1].__setitem__("id", d["images"][0]["id"]), "image id .* appears twice"),
    (lambda d: d["annotations"][1].__setitem__("id", "a1"), "use one id type"),
    (lambda d: d["annotations"][0].__setitem__("image_id", str(d["annotations"][0]["image_id"])), "use one id type"),
    (lambda d: d["annotations"][0].__setitem__("iscrowd", 2), "'iscrowd' must be 0 or 1"),
    (lambda d: d["annotations"][0].__setitem__("bbox", [0, 0, -5, 5]), "width and height must be >= 0"),
])
def test_ground_truth_values_are_validated(coco_json: Path, tmp_path: Path, edit, phrase) -> None:
    """Both readers of a COCO JSON (evaluation and the training labels) refuse the same bad values,
    naming the file and the annotation/image id, instead of computing metrics from them."""
    from kapao.data.labels import read_coco

    bad = _corrupted(coco_json, tmp_path / "bad.json", edit)
    good = _gt_results(coco_json)
    with pytest.raises(DataError, match=f"{bad}: .*{phrase}"):
        evaluate_coco(bad, good, COCO_SIGMAS)
    with pytest.raises(DataError, match=f"{bad}: .*{phrase}"):
        read_coco(bad)


def test_all_crowd_ground_truth_says_metrics_are_undefined(coco_json: Path, tmp_path: Path, caplog) -> None:
    bad = _corrupted(coco_json, tmp_path / "crowd.json", lambda d: [a.__setitem__("iscrowd", 1) for a in d["annotations"]])
    with caplog.at_level("WARNING", logger="kapao"):
        m = evaluate_coco(bad, _gt_results(coco_json), COCO_SIGMAS)
    assert m["AP"] == -1 and "no person to evaluate (all annotations are iscrowd=1)" in caplog.text
