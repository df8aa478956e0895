"""`kapao val --analyze`: the error diagnosis of Ronchi & Perona (ICCV 2017) as one result (analysis.json).

Contents: keypoint error counts of matched persons (:mod:`kapao.eval.analysis`), AP after fixing each error
kind cumulatively (``ap``) and each alone (``ap_single``) (:mod:`kapao.eval.breakdown`), per keypoint type
the mean ks and the share of each kind,
and the same counts and APs on groups of ground-truth persons, as the reference's sensitivity studies form
them (matteorr/coco-analyze ``analysisAPI``):

* ``by_size``: OKS area (0.53 x box for CrowdPose) in (32², 64²], (64², 96²], (96², 128²], (128², 1e5²],
  each analysed as its own area range.
* ``by_overlap``: number of other annotations of the image whose box IoU with the person's is > 0.1:
  0, 1-2, 3-8; ``by_visible_keypoints``: the number of labelled keypoints in four groups of ceil(K/4)
  (COCO: 1-5, 6-10, 11-15, 16-17). Persons outside a group are ignored, as the reference does with gtIgnoreIds.

Each group reports its persons, the error counts of the detections matched to them and the AP at OKS 0.75
(the reference's threshold for these studies) after each cumulative step. The reference's size study fixes
one kind at a time; here every group gets the cumulative steps, like the overall result.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import numpy as np
from pycocotools.coco import COCO

from kapao.cfg.schema import KeypointSchema
from kapao.eval.analysis import (
    AREA_ALL,
    KINDS,
    MAX_DETS,
    AnalysisParams,
    Detections,
    PersonErrors,
    find_errors,
    make_detections,
    oks_area,
)
from kapao.eval.breakdown import Curves, ap_table, cumulative_curves, single_curves
from kapao.eval.metrics import _load_gt, _quiet, sort_results

SIZE_GROUPS = {"medium": (32 ** 2, 64 ** 2), "large": (64 ** 2, 96 ** 2), "xlarge": (96 ** 2, 128 ** 2),
               "xxlarge": (128 ** 2, 1e5 ** 2)}
OVERLAP_IOU = 0.1
OVERLAP_GROUPS = {"0": (0,), "1-2": (1, 2), "3-8": tuple(range(3, 9))}
GROUP_OKS = 0.75  # the reference's sensitivity studies evaluate at this one OKS threshold


@dataclass
class Analysis:
    """The diagnosis: `summary` is analysis.json; curves, errors and detections feed the pictures."""

    summary: dict[str, Any]
    curves: dict[str, Curves]
    errors: list[PersonErrors]
    detections: Detections
    coco_gt: COCO


def diagnose(gt: str | COCO, results: Sequence[Mapping[str, Any]], schema: KeypointSchema, protocol: str = "coco",
            *, groups: bool = True) -> Analysis:
    """The full diagnosis of `results` against `gt` (see the module docstring); groups=False skips the
    by_size / by_overlap / by_visible_keypoints studies (the slow part: one analysis per group)."""
    with _quiet():
        coco_gt = _load_gt(gt, schema.num_keypoints, protocol=protocol)
        dets = make_detections(coco_gt, sort_results(results), MAX_DETS)
        params = AnalysisParams(tuple(schema.sigmas), tuple(schema.flip_index), box_area=protocol == "crowdpose")
        errors = find_errors(coco_gt, dets, params)
        curves = cumulative_curves(coco_gt, dets, errors, params)
        summary: dict[str, Any] = {
            "keypoints": kind_counts(errors),
            "ap": ap_table(curves, params.oks_thrs),
            "ap_single": ap_table(single_curves(coco_gt, dets, errors, params), params.oks_thrs),
            "per_keypoint": per_keypoint(errors, schema),
            "persons": {"ground_truth": _countable(coco_gt, params.area_rng, params),
                        "detections": len(dets.anns), "analysed": len(errors)},
            "settings": {"oks_thresholds": [round(float(t), 2) for t in params.oks_thrs], "localisation_oks": 0.1,
                         "ks_thresholds": [0.5, 0.85], "area_range": list(AREA_ALL), "max_dets": MAX_DETS,
                         "protocol": protocol, "num_keypoints": schema.num_keypoints},
        }
        if groups:
            summary.update(group_studies(coco_gt, dets, params, schema.num_keypoints))
    dets.oks_cache.clear()
    return Analysis(summary, curves, errors, dets, coco_gt)


def kind_counts(errors: Sequence[PersonErrors]) -> dict[str, int]:
    """Labelled keypoints of the analysed detections per kind (good, jitter, inversion, swap, miss)."""
    if not errors:
        return {k: 0 for k in KINDS}
    kinds = np.concatenate([pe.kinds for pe in errors])
    return {name: int(np.sum(kinds == code)) for code, name in enumerate(KINDS)}


def per_keypoint(errors: Sequence[PersonErrors], schema: KeypointSchema) -> dict[str, dict[str, Any]]:
    """Per keypoint type: labelled count, mean ks with the matched person, count and share of each kind."""
    k = schema.num_keypoints
    kinds = np.stack([pe.kinds for pe in errors]) if errors else np.zeros((0, k), dtype=int)
    ks = np.stack([pe.ks for pe in errors]) if errors else np.zeros((0, k))
    out = {}
    for j, name in enumerate(schema.names):
        labelled = kinds[:, j] >= 0
        n = int(labelled.sum())
        row: dict[str, Any] = {"labelled": n, "mean_ks": float(ks[labelled, j].mean()) if n else None}
        for code, kind in enumerate(KINDS):
            c = int(np.sum(kinds[:, j] == code))
            row[kind] = c
            row[f"{kind}_share"] = c / n if n else None
        out[name] = row
    return out


def _countable(coco_gt: COCO, area_rng: tuple[float, float], params: AnalysisParams) -> int:
    """Ground-truth persons that count (not crowd, with labelled keypoints, OKS area inside the range)."""
    return sum(1 for a in coco_gt.dataset["annotations"]
               if not a.get("iscrowd") and a["num_keypoints"] > 0 and area_rng[0] <= oks_area(a, params) <= area_rng[1])


def _study(coco_gt: COCO, dets: Detections, params: AnalysisParams, members: set, ignore: frozenset) -> dict[str, Any]:
    errors = find_errors(coco_gt, dets, params, ignore)
    curves = cumulative_curves(coco_gt, dets, errors, params, ignore)
    table = ap_table(curves, params.oks_thrs)
    mine = [pe for pe in errors if pe.gt_id in members]
    return {"persons": len(members), "keypoints": kind_counts(mine),
            "ap75": {step: row["AP75"] for step, row in table.items()}}


def group_studies(coco_gt: COCO, dets: Detections, params: AnalysisParams, num_keypoints: int) -> dict[str, Any]:
    """by_size, by_overlap and by_visible_keypoints (see the module docstring), at OKS 0.75 as the reference."""
    params = replace(params, oks_thrs=(GROUP_OKS,))
    anns = coco_gt.dataset["annotations"]
    by_size = {}
    for name, (lo, hi) in SIZE_GROUPS.items():
        members = {a["id"] for a in anns if lo < oks_area(a, params) <= hi}
        by_size[name] = _study(coco_gt, dets, replace(params, area_rng=(lo, hi)), members, frozenset())
    all_ids = {a["id"] for a in anns}
    overlaps = overlap_counts(coco_gt, params)
    by_overlap = {}
    for name, counts in OVERLAP_GROUPS.items():
        members = {i for i, n in overlaps.items() if n in counts}
        by_overlap[name] = _study(coco_gt, dets, params, members, frozenset(all_ids - members))
    by_visible = {}
    for lo, hi in visible_keypoint_groups(num_keypoints):
        members = {a["id"] for a in anns if lo <= a["num_keypoints"] <= hi}
        by_visible[f"{lo}-{hi}" if hi > lo else str(lo)] = _study(coco_gt, dets, params, members,
                                                                  frozenset(all_ids - members))
    return {"by_size": by_size, "by_overlap": by_overlap, "by_visible_keypoints": by_visible}


def visible_keypoint_groups(num_keypoints: int) -> list[tuple[int, int]]:
    """Four groups of labelled-keypoint counts, ceil(K/4) wide: COCO-17 gives 1-5, 6-10, 11-15, 16-17."""
    width = math.ceil(num_keypoints / 4)
    return [(lo, min(lo + width - 1, num_keypoints)) for lo in range(1, num_keypoints + 1, width)]


def overlap_counts(coco_gt: COCO, params: AnalysisParams) -> dict[Any, int]:
    """Annotation id -> how many other annotations of its image overlap its box at IoU > 0.1."""
    out = {}
    for anns in coco_gt.imgToAnns.values():
        anns = [a for a in anns if 0 <= oks_area(a, params) < 1e5 ** 2]
        boxes = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        iou = box_iou(boxes)
        for i, a in enumerate(anns):
            out[a["id"]] = int(np.sum(np.delete(iou[i], i) > OVERLAP_IOU))
    return out


def box_iou(boxes: np.ndarray) -> np.ndarray:
    """IoU (n, n) of boxes (n, 4) [x, y, w, h]; 0 where the union is empty."""
    x0, y0 = boxes[:, 0], boxes[:, 1]
    x1, y1 = x0 + boxes[:, 2], y0 + boxes[:, 3]
    w = np.clip(np.minimum(x1[:, None], x1[None]) - np.maximum(x0[:, None], x0[None]), 0, None)
    h = np.clip(np.minimum(y1[:, None], y1[None]) - np.maximum(y0[:, None], y0[None]), 0, None)
    inter = w * h
    area = boxes[:, 2] * boxes[:, 3]
    union = area[:, None] + area[None] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def format_analysis(summary: Mapping[str, Any]) -> str:
    """The short printed table: error kinds, AP after each cumulative fix, the weakest keypoint types."""
    counts = summary["keypoints"]
    total = sum(counts.values())
    lines = [f"Error analysis (Ronchi & Perona 2017): {summary['persons']['analysed']} matched persons, "
             f"{total} labelled keypoints (area >= 32², maxDets 20)"]
    lines.append("  " + "  ".join(f"{k} {100 * v / total:.1f}%" if total else f"{k} -" for k, v in counts.items()))
    lines.append(f"  {'AP after fixing (cumulative)':<30}{'AP':>7}{'AP50':>7}{'AP75':>7}")
    for step, row in summary["ap"].items():
        label = step if step == "baseline" else f"+ {step}"
        lines.append(f"  {label:<30}" + "".join(f"{row.get(k, -1):7.3f}" for k in ("AP", "AP50", "AP75")))
    lines.append(f"  {'keypoint':<16}{'mean ks':>8}" + "".join(f"{k:>10}" for k in KINDS))
    for name, row in summary["per_keypoint"].items():
        if not row["labelled"]:
            continue
        shares = "".join(f"{100 * row[f'{k}_share']:9.1f}%" for k in KINDS)
        lines.append(f"  {name:<16}{row['mean_ks']:8.3f}{shares}")
    return "\n".join(lines)
