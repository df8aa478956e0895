"""Error diagnosis (Ronchi & Perona 2017): planted errors are found where they were planted, and nothing else;
the cumulative AP; crowd regions; ties; K = 17, 14 and 5."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from kapao.cfg.schema import BOX_AREA_FACTOR, KeypointSchema
from kapao.eval.analysis import GOOD, INVERSION, JITTER, MISS, SWAP, UNLABELLED, AnalysisParams, find_errors, make_detections
from kapao.eval.breakdown import STEPS, soft_nms
from kapao.eval.diagnosis import diagnose, visible_keypoint_groups
from kapao.eval.metrics import _load_gt, sort_results

FIVE = KeypointSchema(names=("nose", "left_eye", "right_eye", "left_ear", "right_ear"), flip_index=(0, 2, 1, 4, 3),
                      sigmas=(0.026, 0.025, 0.025, 0.035, 0.035))
# keypoint index of each planted error, per keypoint set (None: no unlabelled keypoint)
PLANS = {
    "coco": ({JITTER: 0, INVERSION: 5, SWAP: 9, MISS: 13}, 16),
    "crowdpose": ({JITTER: 12, INVERSION: 0, SWAP: 4, MISS: 8}, 13),
    "five": ({JITTER: 0, INVERSION: 1, SWAP: 3, MISS: 4}, None),
}
AREA = 10000.0


def schema_of(name: str) -> KeypointSchema:
    return FIVE if name == "five" else KeypointSchema.builtin(name)


def person(k: int, x0: float, y0: float, unlabelled: int | None = None) -> np.ndarray:
    """K keypoints (K, 3) on a 2-row grid 40 px apart, all labelled (v=2) but `unlabelled`."""
    kp = np.array([[x0 + 40 * (j // 2), y0 + 40 * (j % 2), 2] for j in range(k)], dtype=np.float64)
    if unlabelled is not None:
        kp[unlabelled] = 0
    return kp


def ks_distance(ks: float, sigma: float, area: float) -> float:
    """The distance at which a keypoint has similarity ks (the OKS formula solved for d)."""
    return math.sqrt(-math.log(ks) * 2 * area * (2 * sigma) ** 2)


def scene(name: str, extra_gt: list | None = None) -> tuple[dict, list, KeypointSchema, str]:
    """Persons A and B; A's detection has one planted error of each kind, B's is exact."""
    schema = schema_of(name)
    k = schema.num_keypoints
    plan, unl = PLANS[name]
    a, b = person(k, 50, 100, unl), person(k, 50 + 40 * math.ceil(k / 2) + 200, 100)
    protocol = "crowdpose" if name == "crowdpose" else "coco"

    def ann(i: int, kp: np.ndarray) -> dict:
        lab = kp[kp[:, 2] > 0]
        x0, y0 = lab[:, 0].min() - 20, lab[:, 1].min() - 20
        w, h = lab[:, 0].max() - x0 + 20, lab[:, 1].max() - y0 + 20
        d = {"id": i, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [x0, y0, w, h],
             "keypoints": kp.ravel().tolist(), "num_keypoints": int((kp[:, 2] > 0).sum())}
        if protocol == "coco":
            d["area"] = AREA
        return d

    anns = [ann(1, a), ann(2, b)] + (extra_gt or [])
    oks_area = anns[0]["bbox"][2] * anns[0]["bbox"][3] * BOX_AREA_FACTOR if protocol == "crowdpose" else AREA
    dt = a.copy()
    dt[plan[JITTER], 1] += ks_distance(0.7, schema.sigmas[plan[JITTER]], oks_area)
    dt[plan[INVERSION], :2] = a[schema.flip_index[plan[INVERSION]], :2]
    dt[plan[SWAP], :2] = b[plan[SWAP], :2]
    dt[plan[MISS], 1] += 300
    if unl is not None:
        dt[unl, :2] = (5, 5)
    dt[:, 2] = 1
    bt = b.copy()
    bt[:, 2] = 1
    image = {"id": 1, "width": 1200, "height": 600, "file_name": "a.jpg"}
    if protocol == "crowdpose":
        image["crowdIndex"] = 0.5
    gt = {"images": [image], "annotations": anns, "categories": [{"id": 1, "name": "person", "keypoints": list(schema.names)}]}
    results = [{"image_id": 1, "category_id": 1, "keypoints": dt.ravel().tolist(), "score": 0.9},
               {"image_id": 1, "category_id": 1, "keypoints": bt.ravel().tolist(), "score": 0.8}]
    return gt, results, schema, protocol


def _coco(gt: dict, schema: KeypointSchema, protocol: str) -> COCO:
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    return _load_gt(coco, schema.num_keypoints, protocol=protocol)


@pytest.mark.parametrize("name", list(PLANS))
def test_each_planted_error_is_found_at_its_keypoint_and_nothing_else(name: str):
    gt, results, schema, protocol = scene(name)
    coco = _coco(gt, schema, protocol)
    dets = make_detections(coco, sort_results(results))
    params = AnalysisParams(schema.sigmas, schema.flip_index, box_area=protocol == "crowdpose")
    errors = {pe.gt_id: pe for pe in find_errors(coco, dets, params)}
    plan, unl = PLANS[name]
    expected = np.full(schema.num_keypoints, GOOD)
    for kind, j in plan.items():
        expected[j] = kind
    if unl is not None:
        expected[unl] = UNLABELLED
    assert errors[1].kinds.tolist() == expected.tolist()
    assert errors[2].kinds.tolist() == [GOOD] * schema.num_keypoints
    assert errors[1].ks[plan[JITTER]] == pytest.approx(0.7)
    # the reference's fixes: a jitter lands at ks 0.85 ** (1/4), a miss at 0.5 ** (1/4) of the matched person
    a = np.asarray(gt["annotations"][0]["keypoints"]).reshape(-1, 3)
    area = params.box_area and gt["annotations"][0]["bbox"][2] * gt["annotations"][0]["bbox"][3] * BOX_AREA_FACTOR or AREA
    for kind, ks in ((JITTER, 0.85 ** 0.25), (MISS, 0.5 ** 0.25)):
        j = plan[kind]
        d2 = np.sum((errors[1].fixed_xy[j] - a[j, :2]) ** 2)
        assert math.exp(-d2 / (2 * schema.sigmas[j]) ** 2 / area / 2) == pytest.approx(ks)


@pytest.mark.parametrize("name", list(PLANS))
def test_cumulative_ap_reaches_1_once_everything_is_fixed(name: str):
    gt, results, schema, protocol = scene(name)
    far = {"image_id": 1, "category_id": 1, "keypoints": (person(schema.num_keypoints, 50, 400) + [0, 0, -1]).ravel().tolist(),
           "score": 0.95}  # a background false positive, best scored
    summary = diagnose(_coco(gt, schema, protocol), results + [far], schema, protocol, groups=False).summary
    ap = [summary["ap"][s]["AP"] for s in STEPS]
    assert list(summary["ap"]) == list(STEPS)
    assert ap[0] < 1.0 and all(b >= a - 1e-12 for a, b in zip(ap, ap[1:]))
    assert summary["ap"]["jitter"]["AP"] < 1.0  # the false positive is still first
    assert summary["ap"]["score"]["AP"] == pytest.approx(1.0)  # rescored to ~0, it falls behind both persons
    assert summary["ap"]["false_negative"]["AP"] == pytest.approx(1.0)
    assert summary["keypoints"]["swap"] == summary["keypoints"]["inversion"] == 1
    assert summary["keypoints"]["jitter"] == summary["keypoints"]["miss"] == 1


def test_the_keypoint_fixes_alone_bring_ap_to_1_and_each_fix_helps():
    gt, results, schema, protocol = scene("five")
    summary = diagnose(_coco(gt, schema, protocol), results, schema, protocol, groups=False).summary
    ap = {s: summary["ap"][s]["AP"] for s in STEPS}
    assert ap["baseline"] < ap["miss"] < ap["swap"] < ap["inversion"] <= ap["jitter"] == pytest.approx(1.0)
    single = {s: summary["ap_single"][s]["AP"] for s in STEPS[1:]}  # each kind alone: some help, none to 1
    assert all(ap["baseline"] < single[s] < 1.0 for s in ("miss", "swap", "inversion"))
    assert ap["baseline"] <= single["jitter"] < 1.0
    assert single["score"] > ap["baseline"]  # B (exact) is now ranked before A (four errors)
    assert single["background_fp"] > ap["baseline"]  # A, unmatched at the high thresholds, is ignored there
    assert single["false_negative"] == pytest.approx(1.0)


def test_crowd_regions_are_ignored_as_cocoeval_does():
    crowd = {"id": 9, "image_id": 1, "category_id": 1, "iscrowd": 1, "area": 20000.0, "bbox": [600.0, 300.0, 200.0, 150.0],
             "keypoints": [0] * 51, "num_keypoints": 0}
    gt, results, schema, protocol = scene("coco", [crowd])
    inside = person(17, 650, 350)
    inside[:, 2] = 1
    with_crowd_dt = results + [{"image_id": 1, "category_id": 1, "keypoints": inside.ravel().tolist(), "score": 0.99}]
    plain = diagnose(_coco(gt, schema, protocol), results, schema, protocol, groups=False).summary
    crowded = diagnose(_coco(gt, schema, protocol), with_crowd_dt, schema, protocol, groups=False).summary
    assert crowded["persons"]["analysed"] == plain["persons"]["analysed"] == 2  # the crowd match is not diagnosed
    assert crowded["keypoints"] == plain["keypoints"]
    assert crowded["ap"]["baseline"] == plain["ap"]["baseline"]  # neither a true nor a false positive


def test_tied_scores_give_the_same_analysis_in_any_input_order():
    gt, results, schema, protocol = scene("coco")
    extra = [dict(r, keypoints=(np.asarray(r["keypoints"]) + 2.0).tolist()) for r in results]
    tied = [dict(r, score=0.5) for r in results + extra]
    first = diagnose(_coco(gt, schema, protocol), tied, schema, protocol).summary
    for seed in range(3):
        shuffled = tied[:]
        random.Random(seed).shuffle(shuffled)
        assert diagnose(_coco(gt, schema, protocol), shuffled, schema, protocol).summary == first
    json.dumps(first)  # analysis.json is plain JSON


def test_soft_nms_decays_a_duplicate_and_keeps_order_on_ties():
    kp = person(17, 50, 100)
    kp[:, 2] = 1
    far = person(17, 800, 100)
    far[:, 2] = 1
    both = np.stack([kp.ravel(), kp.ravel(), far.ravel()])
    sig = np.asarray(KeypointSchema.builtin("coco").sigmas)
    out = soft_nms(both, np.array([0.9, 0.9, 0.8]), sig)
    assert out[0] == 0.9 and out[1] == pytest.approx(0.9 * math.exp(-1 / 0.5)) and out[2] == pytest.approx(0.8)


def test_groups_and_their_keypoint_bins():
    assert visible_keypoint_groups(17) == [(1, 5), (6, 10), (11, 15), (16, 17)]  # the reference's COCO bins
    assert visible_keypoint_groups(14) == [(1, 4), (5, 8), (9, 12), (13, 14)]
    assert visible_keypoint_groups(5) == [(1, 2), (3, 4), (5, 5)]
    gt, results, schema, protocol = scene("coco")
    s = diagnose(_coco(gt, schema, protocol), results, schema, protocol).summary
    assert s["by_overlap"]["0"]["persons"] == 2 and s["by_visible_keypoints"]["16-17"]["persons"] == 2
    assert s["by_size"]["xlarge"]["persons"] == 2 and s["by_size"]["medium"]["persons"] == 0  # area 100²
    assert s["by_size"]["xlarge"]["keypoints"] == s["keypoints"]


def test_coco_mini_ground_truth_as_predictions_is_all_good(coco_mini: Path):
    ann = coco_mini / "person_keypoints.json"
    data = json.loads(ann.read_text())
    results = [{"image_id": a["image_id"], "category_id": 1, "score": 1.0,
                "keypoints": [v if i % 3 != 2 else 1 for i, v in enumerate(a["keypoints"])]}
               for a in data["annotations"] if a["num_keypoints"]]
    s = diagnose(ann, results, KeypointSchema.builtin("coco"), groups=False).summary
    labelled = sum(a["num_keypoints"] for a in data["annotations"])
    assert s["keypoints"] == {"good": labelled, "jitter": 0, "inversion": 0, "swap": 0, "miss": 0}
    assert all(row["AP"] == pytest.approx(1.0) for row in s["ap"].values())


def test_vectorised_oks_equals_pycocotools():
    from pycocotools.cocoeval import COCOeval

    from kapao.eval.analysis import AnalysisEval

    rng = np.random.default_rng(0)
    schema = KeypointSchema.builtin("coco")
    anns, results = [], []
    for i in range(40):
        kp = np.c_[rng.integers(0, 600, (17, 2)), rng.integers(0, 3, 17)]
        if i % 7 == 0:
            kp[:, 2] = 0  # no labelled keypoint: pycocotools measures the distance to the doubled box
        anns.append({"id": i + 1, "image_id": i % 4, "category_id": 1, "iscrowd": 0, "area": float(rng.uniform(500, 9e4)),
                     "bbox": [float(v) for v in rng.uniform(0, 300, 4)], "keypoints": kp.ravel().tolist(),
                     "num_keypoints": int((kp[:, 2] > 0).sum())})
    for i in range(90):
        kp = np.c_[rng.uniform(0, 600, (17, 2)), np.ones(17)]
        results.append({"image_id": i % 4, "category_id": 1, "keypoints": kp.ravel().tolist(), "score": float(rng.random())})
    gt = {"images": [{"id": i} for i in range(4)], "annotations": anns, "categories": [{"id": 1, "name": "person"}]}
    coco = _coco(gt, schema, "coco")
    dets = make_detections(coco, sort_results(results), 30)
    mine = AnalysisEval(coco, dets, AnalysisParams(schema.sigmas, schema.flip_index), [0.5], 30)
    ref = COCOeval(coco, dets.coco, iouType="keypoints")
    ref.params.kpt_oks_sigmas, ref.params.maxDets = np.asarray(schema.sigmas), [30]
    mine._prepare()
    ref._prepare()
    for img in range(4):
        a, b = mine.computeOks(img, 1), ref.computeOks(img, 1)
        assert a.shape == b.shape == (min(30, 23 if img < 2 else 22), 10)
        assert np.max(np.abs(a - b)) < 1e-15  # numpy's vectorised exp may differ from its 1-D one in the last bit
