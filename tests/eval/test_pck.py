"""PCK against hand-computed values; matched persons only."""
from __future__ import annotations

import numpy as np
import pytest
from pycocotools.coco import COCO

from kapao.cfg.schema import KeypointSchema
from kapao.eval.pck import evaluate_pck

FIVE = KeypointSchema(names=("a", "b", "c", "d", "e"), flip_index=(0, 1, 2, 3, 4), sigmas=(0.05,) * 5)
DISTANCES = (0.0, 10.0, 20.0, 25.0, 100.0)  # pixels, along x, of the five predicted keypoints


def _gt(with_second: bool = False) -> COCO:
    kp = [[100 + 10 * j, 100 + 5 * j, 2] for j in range(5)]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 5000.0, "bbox": [80.0, 90.0, 100.0, 50.0],
             "keypoints": np.ravel(kp).tolist(), "num_keypoints": 5, "head_bbox": [90.0, 90.0, 30.0, 40.0]}]
    if with_second:  # a person nobody predicts: left out, not scored 0
        anns.append({**anns[0], "id": 2, "bbox": [500.0, 90.0, 100.0, 50.0],
                     "keypoints": np.ravel([[520 + 10 * j, 100, 2] for j in range(5)]).tolist()})
    coco = COCO()
    coco.dataset = {"images": [{"id": 1, "width": 800, "height": 400}], "annotations": anns,
                    "categories": [{"id": 1, "name": "person"}]}
    coco.createIndex()
    return coco


def _results() -> list[dict]:
    kp = [[100 + 10 * j + d, 100 + 5 * j, 1] for j, d in enumerate(DISTANCES)]
    return [{"image_id": 1, "category_id": 1, "keypoints": np.ravel(kp).tolist(), "score": 0.9}]


@pytest.mark.parametrize("second", [False, True])
def test_pck_pckh_and_auc_by_hand(second: bool):
    p = evaluate_pck(_gt(second), _results(), FIVE)
    # box size max(100, 50) = 100: alpha 0.2 -> 20 px; correct: 0, 10, 20
    assert p["PCK"] == pytest.approx(3 / 5)
    assert p["per_keypoint"] == {"a": 1.0, "b": 1.0, "c": 1.0, "d": 0.0, "e": 0.0}
    # head size 0.6 x diag(30, 40) = 30: 0.5 x 30 = 15 px; correct: 0, 10
    assert p["PCKh@0.5"] == pytest.approx(2 / 5)
    # alpha = 0.01..0.50: d=0 always (50), d=10 from 0.10 (41), d=20 from 0.20 (31), d=25 from 0.25 (26), d=100 never
    assert p["AUC"] == pytest.approx((50 + 41 + 31 + 26) / 250)
    assert p["matched_persons"] == 1 and p["persons"] == (2 if second else 1)


def test_pck_alpha_and_no_head_boxes():
    gt = _gt()
    for a in gt.dataset["annotations"]:
        del a["head_bbox"]
    p = evaluate_pck(gt, _results(), FIVE, alpha=0.25)
    assert p["PCK"] == pytest.approx(4 / 5) and p["PCKh@0.5"] is None


def test_pck_without_predictions():
    p = evaluate_pck(_gt(), [], FIVE)
    assert p["PCK"] is None and p["AUC"] is None and p["matched_persons"] == 0


def test_analysis_without_predictions():
    from kapao.eval.diagnosis import diagnose

    s = diagnose(_gt(), [], FIVE).summary
    assert s["persons"]["analysed"] == 0 and s["ap"]["baseline"]["AP"] == 0.0 and s["ap"]["false_negative"]["AP"] == -1.0
