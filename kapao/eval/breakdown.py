"""AP after fixing each kind of error, cumulatively, as Ronchi & Perona (ICCV 2017) and their reference code
(matteorr/coco-analyze, ``COCOanalyze.summarize``) compute it.

Steps, each on top of the previous ones (OKS 0.50:0.95, area range "all" = [32², 1e5²], maxDets 20):

1. ``baseline``: the detections as they are.
2. ``miss``, ``swap``, ``inversion``, ``jitter``: the keypoints of that error kind moved to their fixed
   positions (:mod:`kapao.eval.analysis`).
3. ``score``: every detection rescored optimally: its score becomes the best OKS it reaches with any
   ground-truth person that is not ignored (OKS 0.5 evaluation over all detections of its image), then a
   soft-NMS on those scores per image (detections taken best first; each remaining one multiplied by
   exp(-oks² / 0.5), oks between the two detections over all keypoints with the mean of their keypoint
   extents' areas as scale).
4. ``background_fp``: detections that match no ground truth at an OKS threshold are ignored at that threshold.
5. ``false_negative``: ground-truth persons that no detection matches at an OKS threshold (or at a lower one)
   are ignored as well. Every remaining detection is then a true positive, so this AP is 1 (-1 with no
   person to find).

:func:`single_curves` gives the reference's other study, each kind fixed alone (``ap_single`` in
analysis.json). The reference stores the false-negative curves in the reverse OKS order of the others (its row for OKS 0.5
is labelled 0.95 and so on); here every row keeps its own threshold. All values of step 5 are 1 either way
except in degenerate sets.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from pycocotools.coco import COCO

from kapao.eval.analysis import (
    ERROR_KINDS,
    KINDS,
    AnalysisEval,
    AnalysisParams,
    Detections,
    PersonErrors,
    fixed_keypoints,
    match,
)

STEPS = ("baseline", *ERROR_KINDS, "score", "background_fp", "false_negative")
SOFT_NMS_SIGMA = 0.5  # the reference's soft-NMS hyper-parameter: score *= exp(-oks² / 0.5)
_EPS = np.spacing(1)


@dataclass
class Curves:
    """Accumulated precision (T, R) at the OKS thresholds x recall thresholds 0:0.01:1, and recall (T,)."""

    precision: np.ndarray
    recall: np.ndarray

    def ap(self, t: int | None = None) -> float:
        """COCO-style AP: mean of the precision entries > -1 (at threshold index `t`, else over all)."""
        p = self.precision if t is None else self.precision[t]
        return float(np.mean(p[p > -1])) if np.any(p > -1) else -1.0

    def ar(self) -> float:
        r = self.recall
        return float(np.mean(r[r > -1])) if np.any(r > -1) else -1.0


def _curves(ev: AnalysisEval) -> Curves:
    return Curves(ev.eval["precision"][:, :, 0, 0, 0].copy(), ev.eval["recall"][:, 0, 0, 0].copy())


def _evaluate(coco_gt: COCO, dets: Detections, params: AnalysisParams, keypoints: np.ndarray | None,
              scores: np.ndarray | None, ignore_ids: frozenset, oks_thrs: Sequence[float] | None = None,
              max_dets: int | None = None) -> AnalysisEval:
    dets.set(keypoints, scores)
    ev = AnalysisEval(coco_gt, dets, params, params.oks_thrs if oks_thrs is None else oks_thrs,
                      params.max_dets if max_dets is None else max_dets, ignore_ids)
    ev.evaluate()
    return ev


def cumulative_curves(coco_gt: COCO, dets: Detections, errors: Sequence[PersonErrors], params: AnalysisParams,
                      ignore_ids: frozenset = frozenset()) -> dict[str, Curves]:
    """The curves of every step of :data:`STEPS` (see the module docstring)."""
    out: dict[str, Curves] = {}
    ev = _evaluate(coco_gt, dets, params, None, None, ignore_ids)
    ev.accumulate()
    out["baseline"] = _curves(ev)
    codes = {name: KINDS.index(name) for name in ERROR_KINDS}
    fixed: list[int] = []
    for name in ERROR_KINDS:
        fixed.append(codes[name])
        ev = _evaluate(coco_gt, dets, params, fixed_keypoints(dets, errors, fixed), None, ignore_ids)
        ev.accumulate()
        out[name] = _curves(ev)
    kpts = fixed_keypoints(dets, errors, fixed)
    scores = optimal_scores(coco_gt, dets, kpts, params, ignore_ids)
    ev = _evaluate(coco_gt, dets, params, kpts, scores, ignore_ids)
    ev.accumulate()
    out["score"] = _curves(ev)
    out["background_fp"], out["false_negative"] = _background(coco_gt, ev)
    dets.set()
    return out


def single_curves(coco_gt: COCO, dets: Detections, errors: Sequence[PersonErrors], params: AnalysisParams,
                  ignore_ids: frozenset = frozenset()) -> dict[str, Curves]:
    """The curves after fixing one kind alone, as the reference's AP-improvement study (errorsAPImpact) does:
    each keypoint error kind alone; the optimal scores on the original keypoints; background false positives
    on the original detections; and false negatives on top of those background false positives."""
    out: dict[str, Curves] = {}
    for name in ERROR_KINDS:
        ev = _evaluate(coco_gt, dets, params, fixed_keypoints(dets, errors, [KINDS.index(name)]), None, ignore_ids)
        ev.accumulate()
        out[name] = _curves(ev)
    scores = optimal_scores(coco_gt, dets, dets.keypoints, params, ignore_ids)
    ev = _evaluate(coco_gt, dets, params, None, scores, ignore_ids)
    ev.accumulate()
    out["score"] = _curves(ev)
    ev = _evaluate(coco_gt, dets, params, None, None, ignore_ids)
    ev.accumulate()
    out["background_fp"], out["false_negative"] = _background(coco_gt, ev)
    dets.set()
    return out


def optimal_scores(coco_gt: COCO, dets: Detections, keypoints: np.ndarray, params: AnalysisParams,
                   ignore_ids: frozenset = frozenset()) -> np.ndarray:
    """Scores (N,) of the reference's optimal rescoring: best OKS with a non-ignored person, then soft-NMS."""
    per_image = max((len(v) for v in dets.coco.imgToAnns.values()), default=0)
    ev = _evaluate(coco_gt, dets, params, keypoints, None, ignore_ids, oks_thrs=[min(params.oks_thrs)],
                   max_dets=max(per_image, 1))
    best = np.zeros(len(dets.anns))
    for key, dts in ev._dts.items():
        ious = ev.ious.get(key, [])
        if len(ious) == 0:
            continue
        order = np.argsort([-d["score"] for d in dts], kind="mergesort")
        keep = np.array([g["_ignore"] == 0 for g in ev._gts[key]], dtype=bool)
        if not keep.any():
            continue
        for row, i in enumerate(order[: len(ious)]):
            best[dts[i]["id"] - 1] = float(np.max(np.asarray(ious)[row, keep]))
    cat = ev.params.catIds[0]
    for img in ev.params.imgIds:
        ids = [d["id"] - 1 for d in ev._dts.get((img, cat), [])]
        best[ids] = soft_nms(keypoints[ids], best[ids], np.asarray(params.sigmas, dtype=np.float64))
    return best


def soft_nms(keypoints: np.ndarray, scores: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """The reference's soft-NMS of one image's detections: keypoints (n, 3K), scores (n,) -> new scores (n,).

    Greedy, best first (a stable sort each round, so ties keep the detections' order); every remaining
    detection's score is multiplied by exp(-oks² / 0.5), oks over all K keypoints with the mean keypoint
    extent area of the pair as scale.
    """
    scores = scores.astype(np.float64).copy()
    xs, ys = keypoints[:, 0::3], keypoints[:, 1::3]
    areas = (xs.max(1) - xs.min(1)) * (ys.max(1) - ys.min(1)) if len(keypoints) else np.zeros(0)
    var = (sigmas * 2) ** 2
    left = list(range(len(scores)))
    while left:
        left.sort(key=lambda i: -scores[i])
        m = left.pop(0)
        for i in left:
            e = ((xs[i] - xs[m]) ** 2 + (ys[i] - ys[m]) ** 2) / var / (0.5 * (areas[m] + areas[i]) + _EPS) / 2
            oks = np.sum(np.exp(-e)) / e.shape[0]
            scores[i] *= np.exp(-(oks ** 2) / SOFT_NMS_SIGMA)
    return scores


def _background(coco_gt: COCO, ev: AnalysisEval) -> tuple[Curves, Curves]:
    """Background false positives, then false negatives, ignored per OKS threshold (on `ev`, evaluated)."""
    dt_to_gt, matched_gts = match(ev)
    all_gts = set(coco_gt.getAnnIds())
    for e in ev.images():
        for t, matched in enumerate(dt_to_gt):
            for d, did in enumerate(e["dtIds"]):
                if did not in matched:
                    e["dtIgnore"][t][d] = True
    ev.accumulate()
    fp = _curves(ev)
    precision, recall = fp.precision.copy(), fp.recall.copy()
    for t, matched_ids in enumerate(matched_gts):
        missed = all_gts - matched_ids
        for e in ev.images():
            for g, gid in enumerate(e["gtIds"]):
                if gid in missed:
                    e["gtIgnore"][g] = 1
        ev.accumulate()
        precision[t], recall[t] = ev.eval["precision"][t, :, 0, 0, 0], ev.eval["recall"][t, 0, 0, 0]
    return fp, Curves(precision, recall)


def ap_table(curves: dict[str, Curves], oks_thrs: Sequence[float]) -> dict[str, dict[str, Any]]:
    """Per step: AP (0.50:0.95), AP50, AP75, AR and the AP at every OKS threshold."""
    thr = [round(float(t), 2) for t in oks_thrs]
    out = {}
    for step, c in curves.items():
        row: dict[str, Any] = {"AP": c.ap()}
        for name, t in (("AP50", 0.5), ("AP75", 0.75)):
            if t in thr:
                row[name] = c.ap(thr.index(t))
        row["AR"] = c.ar()
        row["AP_per_oks"] = {f"{t:.2f}": c.ap(i) for i, t in enumerate(thr)}
        out[step] = row
    return out
