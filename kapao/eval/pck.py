"""PCK (percentage of correct keypoints) of multi-person predictions, for the single-person and top-down
data that papers report it on.

What it is: each ground-truth person (not crowd, with labelled keypoints, any size) is paired with at most
one prediction by COCOeval's greedy matching (predictions by score, best OKS first, OKS >= 0.1, at most 20
per image); **only matched persons count** — a person no prediction matches is left out, not scored 0
(the number matched is reported next to the PCK). A labelled keypoint is correct when its distance to the
ground truth is <= alpha x the person's box size max(w, h) (PCK@alpha, alpha 0.2 by default), or, for PCKh,
<= 0.5 x the head size 0.6 x the diagonal of the annotation's ``head_bbox`` [x, y, w, h] (MPII's rule), over
the persons that carry one. AUC: the mean of PCK@alpha over alpha = 0.01, 0.02, ..., 0.50 (50 values).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from pycocotools.coco import COCO

from kapao.cfg.schema import KeypointSchema
from kapao.eval.analysis import LOCALISATION_OKS, MAX_DETS, AnalysisEval, AnalysisParams, make_detections, match
from kapao.eval.metrics import _load_gt, _quiet, sort_results

PCK_ALPHA = 0.2
PCKH_ALPHA = 0.5
HEAD_SIZE_FACTOR = 0.6  # MPII: head size = 0.6 x the head box diagonal
AUC_ALPHAS = np.round(np.arange(1, 51) * 0.01, 2)


def matched_pairs(coco_gt: COCO, results: Sequence[Mapping[str, Any]], schema: KeypointSchema,
                  protocol: str = "coco") -> list[tuple[dict[str, Any], np.ndarray]]:
    """(ground-truth annotation, predicted keypoints (K, 3)) for every person matched at OKS >= 0.1."""
    params = AnalysisParams(tuple(schema.sigmas), tuple(schema.flip_index), box_area=protocol == "crowdpose",
                            area_rng=(0.0, 1e5 ** 2))
    dets = make_detections(coco_gt, sort_results(results), MAX_DETS)
    ev = AnalysisEval(coco_gt, dets, params, [LOCALISATION_OKS], MAX_DETS)
    ev.evaluate()
    pairs = []
    for did, gid in sorted(match(ev)[0][0].items()):
        gt = coco_gt.anns[gid]
        if gt.get("iscrowd") or gt["num_keypoints"] == 0:
            continue
        pairs.append((gt, dets.keypoints[did - 1].reshape(-1, 3)))
    return pairs


def correct(pairs: Sequence[tuple[dict[str, Any], np.ndarray]], alpha: float, num_keypoints: int,
            head: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per pair and keypoint: correct (P, K) bool and labelled (P, K) bool, at threshold alpha x the
    box size max(w, h), or alpha x the head size with head=True (pairs without head_bbox: nothing labelled)."""
    hits, labelled = [], []
    for gt, pred in pairs:
        g = np.asarray(gt["keypoints"], dtype=np.float64).reshape(-1, 3)
        if head:
            hb = gt.get("head_bbox")
            norm = HEAD_SIZE_FACTOR * float(np.hypot(hb[2], hb[3])) if hb else None
        else:
            norm = float(max(gt["bbox"][2], gt["bbox"][3]))
        dist = np.hypot(pred[:, 0] - g[:, 0], pred[:, 1] - g[:, 1])
        lab = (g[:, 2] > 0) & (norm is not None)
        hits.append(lab & (dist <= alpha * (norm or 0.0)))
        labelled.append(lab)
    k = num_keypoints
    return (np.array(hits, dtype=bool).reshape(-1, k), np.array(labelled, dtype=bool).reshape(-1, k))


def _share(hits: np.ndarray, labelled: np.ndarray) -> float | None:
    n = int(labelled.sum())
    return float(hits.sum() / n) if n else None


def evaluate_pck(gt: str | COCO, results: Sequence[Mapping[str, Any]], schema: KeypointSchema,
                 protocol: str = "coco", alpha: float = PCK_ALPHA) -> dict[str, Any]:
    """PCK@alpha overall and per keypoint, its AUC, PCKh@0.5 (None without head boxes), and the counts."""
    with _quiet():
        coco_gt = _load_gt(gt, schema.num_keypoints, protocol=protocol)
        pairs = matched_pairs(coco_gt, results, schema, protocol)
    persons = sum(1 for a in coco_gt.dataset["annotations"] if not a.get("iscrowd") and a["num_keypoints"] > 0)
    k = schema.num_keypoints
    hits, lab = correct(pairs, alpha, k)
    auc = [_share(*correct(pairs, float(a), k)) for a in AUC_ALPHAS]
    head_hits, head_lab = correct(pairs, PCKH_ALPHA, k, head=True)
    return {
        "alpha": alpha, "PCK": _share(hits, lab),
        "AUC": float(np.mean([a for a in auc if a is not None])) if pairs and auc[0] is not None else None,
        "PCKh@0.5": _share(head_hits, head_lab),
        "per_keypoint": {name: _share(hits[:, j], lab[:, j]) for j, name in enumerate(schema.names)},
        "matched_persons": len(pairs), "persons": persons,
        "head_boxes": int(sum(1 for gt, _ in pairs if gt.get("head_bbox"))),
    }


def format_pck(pck: Mapping[str, Any]) -> str:
    """PCK as a short table: the overall numbers, then per keypoint."""
    def f(v: float | None) -> str:
        return "   -  " if v is None else f"{v:6.3f}"

    lines = [f" PCK@{pck['alpha']:g} (box size) = {f(pck['PCK'])}   AUC(alpha 0.01-0.50) = {f(pck['AUC'])}   "
             f"PCKh@0.5 = {f(pck['PCKh@0.5'])}",
             f" matched persons only: {pck['matched_persons']} of {pck['persons']} (OKS >= 0.1)"]
    lines += [f"   {name:<16}{f(v)}" for name, v in pck["per_keypoint"].items()]
    return "\n".join(lines)
