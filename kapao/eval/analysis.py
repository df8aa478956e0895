"""Keypoint error diagnosis of Ronchi & Perona, "Benchmarking and Error Diagnosis in Multi-Instance Pose
Estimation" (ICCV 2017), for any keypoint set: the localisation matching and the per-keypoint error kinds.

The rules and their conventions are those of the paper's reference code (github.com/matteorr/coco-analyze,
``pycocotools/cocoanalyze.py``), generalised from its hard-coded COCO-17 to the dataset's ``flip_idx`` and
``sigmas``:

* A detection is analysed against the ground-truth person it matches at OKS >= 0.1 (COCOeval's greedy
  matching, area range "all" = [32², 1e5²], at most 20 detections per image); matches to persons without
  labelled keypoints are skipped.
* Per labelled keypoint j, the keypoint similarity ks is computed against every candidate of the image,
  in this row order: the matched person, the other annotations of the image, the matched person
  left-right flipped (keypoint j of the flipped person is its keypoint ``flip_idx[j]``), the other
  annotations flipped. Each row uses its own annotation's area; unlabelled candidates give -1. The best
  candidate (the first one on ties) decides: **miss** if its ks < 0.5; else **good** (ks >= 0.85) or
  **jitter** when it is the matched person, **inversion** when it is the matched person flipped, **swap**
  for any other annotation (flipped or not).
* The fixed position of an erroneous keypoint is the ground-truth point moved along x by
  ``sqrt(-ln(ks_target) * 2 * area * sigma²)``, with ks_target 0.85 for jitter, 0.5 for a miss and the
  ks it reached on the wrong candidate for an inversion or a swap. This is the reference's formula; since
  OKS divides by (2 sigma)², it puts the point at ks = ks_target ** (1/4) of the matched person
  (0.96 for a fixed jitter, 0.84 for a fixed miss). Kept so that the numbers are the reference's.

Deliberate differences: the reference calls a keypoint good only when ks > 0.85, so a keypoint at exactly
0.85 is of no kind there; here it is good (the paper's ks >= 0.85). Detections with equal scores are taken
in kapao's canonical order (:func:`kapao.eval.metrics.sort_results`, as val does) where the reference keeps
the file's order; the two agree on files in that order, such as kapao's own predictions.json.
"""
from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from kapao.cfg.schema import BOX_AREA_FACTOR

KINDS = ("good", "jitter", "inversion", "swap", "miss")
ERROR_KINDS = ("miss", "swap", "inversion", "jitter")  # the order in which they are fixed
GOOD, JITTER, INVERSION, SWAP, MISS = range(5)
UNLABELLED = -1  # kind code of a keypoint the ground truth does not label
OKS_THRESHOLDS = np.linspace(0.5, 0.95, 10)
LOCALISATION_OKS = 0.1
KS_THRESHOLDS = (0.5, 0.85)  # miss below the first; good at or above the second
AREA_ALL = (32.0 ** 2, 1e5 ** 2)
MAX_DETS = 20
_EPS = np.spacing(1)


@dataclass(frozen=True)
class AnalysisParams:
    """What the analysis needs to know of the keypoint set and the protocol.

    sigmas: OKS sigma per keypoint (K,); flip_index: left-right twin of each keypoint (K,);
    box_area: True for the CrowdPose protocol, whose OKS area of a person is 0.53 x its box area.
    """

    sigmas: tuple[float, ...]
    flip_index: tuple[int, ...]
    box_area: bool = False
    area_rng: tuple[float, float] = AREA_ALL
    oks_thrs: tuple[float, ...] = tuple(OKS_THRESHOLDS)
    max_dets: int = MAX_DETS

    @property
    def num_keypoints(self) -> int:
        return len(self.sigmas)


@dataclass
class PersonErrors:
    """The diagnosis of one analysed detection (all arrays (K,), keypoint order of the schema).

    kinds: GOOD..MISS, or UNLABELLED where the ground truth has no label; ks: similarity to the matched
    person's own keypoint (-1 where unlabelled); fixed_xy (K, 2): where each keypoint goes when its error
    is fixed (the detection's own point where it is good or unlabelled); oks: OKS with the matched person.
    """

    dt_index: int
    gt_id: Any
    image_id: Any
    kinds: np.ndarray
    ks: np.ndarray
    fixed_xy: np.ndarray
    oks: float


def ks_matrix(dt_xy: np.ndarray, gts: np.ndarray, areas: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """Keypoint similarity of each detected keypoint to the same keypoint of each candidate.

    dt_xy (K, 2) pixels; gts (C, K, 3) candidates [x, y, v]; areas (C,) their OKS areas (pixels²).
    Returns (C, K): exp(-d² / (2 sigma)² / (area + eps) / 2) where v > 0, -1 where v == 0.
    """
    d2 = np.sum((gts[:, :, :2] - dt_xy[None]) ** 2, axis=2)
    ks = np.exp(-d2 / (sigmas * 2) ** 2 / (areas[:, None] + _EPS) / 2)
    return np.where(gts[:, :, 2] > 0, ks, -1.0)


def classify(dt_xy: np.ndarray, own: np.ndarray, own_area: float, others: np.ndarray, other_areas: np.ndarray,
             params: AnalysisParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Kinds (K,), own ks (K,) and fixed positions (K, 2) of one detection against its matched person.

    own (K, 3) the matched person; others (M, K, 3) the other annotations of the image, with their
    areas (M,). See the module docstring for the rules.
    """
    sig = np.asarray(params.sigmas, dtype=np.float64)
    flip = np.asarray(params.flip_index)
    direct = np.concatenate([own[None], others.reshape(-1, *own.shape)])
    cands = np.concatenate([direct, direct[:, flip]])  # rows: own, others, own flipped, others flipped
    areas = np.concatenate([[own_area], other_areas, [own_area], other_areas]).astype(np.float64)
    ks = ks_matrix(dt_xy, cands, areas, sig)
    n = len(direct)
    best, which = np.max(ks, axis=0), np.argmax(ks, axis=0)
    best = np.maximum(best, 0.0)
    low, high = KS_THRESHOLDS
    kinds = np.select([best < low, which == 0, which == n], [MISS, np.where(best >= high, GOOD, JITTER), INVERSION],
                      SWAP)
    kinds = np.where(own[:, 2] > 0, kinds, UNLABELLED)
    target = np.select([kinds == JITTER, kinds == MISS], [high, low], best)
    target = target + _EPS * (target == 0) - _EPS * (target == 1)
    shift = np.sqrt(-np.log(target) * 2 * own_area * sig ** 2)  # the reference's distance (see module docstring)
    fixed = np.where((kinds > GOOD)[:, None], np.stack([own[:, 0] + shift, own[:, 1]], axis=1), dt_xy)
    return kinds.astype(np.int64), ks[0], fixed


# ----------------------------------------------------------------------------------------------
class AnalysisEval(COCOeval):
    """pycocotools' COCOeval for one area range and one maxDets, with two additions of the analysis:
    ground-truth ids to ignore (the reference's gtIgnoreIds) and the CrowdPose OKS area (0.53 x box).

    OKS matrices are kept in `dets.oks_cache` per image and state of its detections (keypoints and scores):
    the analysis evaluates the same states under several ignore sets and area ranges, and a fix changes few
    images.
    """

    def __init__(self, coco_gt: COCO, dets: Detections, params: AnalysisParams, oks_thrs: Sequence[float],
                 max_dets: int, ignore_ids: frozenset = frozenset()) -> None:
        super().__init__(coco_gt, dets.coco, iouType="keypoints")
        self.dets = dets
        self.cache_key = (tuple(params.sigmas), params.box_area, max_dets)
        p = self.params
        p.kpt_oks_sigmas = np.asarray(params.sigmas, dtype=np.float64)
        p.iouThrs = np.asarray(oks_thrs, dtype=np.float64)
        p.maxDets = [max_dets]
        p.areaRng = [list(params.area_rng)]
        p.areaRngLbl = ["all"]
        self.box_area = params.box_area
        self.ignore_ids = ignore_ids

    def _prepare(self) -> None:
        super()._prepare()
        for gts in self._gts.values():
            for g in gts:
                if g["id"] in self.ignore_ids:
                    g["ignore"] = 1
                if self.box_area:
                    g["area"] = g["bbox"][2] * g["bbox"][3] * BOX_AREA_FACTOR

    def computeOks(self, imgId: Any, catId: Any) -> np.ndarray | list:
        """pycocotools' computeOks with the loop over detections vectorised: the same operations in the same
        order on every element; numpy's exp on a 2-D array may differ from its 1-D path in the last bit, so
        values agree to 1e-15 (tests/eval/test_analysis.py), which matters only for an OKS that close to a
        threshold."""
        key = (*self.cache_key, imgId, catId, self.dets.image_keys.get(imgId))
        if key not in self.dets.oks_cache:
            self.dets.oks_cache[key] = self._oks(imgId, catId)
        return self.dets.oks_cache[key]

    def _oks(self, imgId: Any, catId: Any) -> np.ndarray | list:
        p = self.params
        gts, dts = self._gts[imgId, catId], self._dts[imgId, catId]
        order = np.argsort([-d["score"] for d in dts], kind="mergesort")
        dts = [dts[i] for i in order][: p.maxDets[-1]]
        if len(gts) == 0 or len(dts) == 0:
            return []
        var = (p.kpt_oks_sigmas * 2) ** 2
        d = np.array([dt["keypoints"] for dt in dts])
        xd, yd = d[:, 0::3], d[:, 1::3]
        ious = np.zeros((len(dts), len(gts)))
        for j, gt in enumerate(gts):
            g = np.array(gt["keypoints"])
            xg, yg, vis = g[0::3], g[1::3], g[2::3] > 0
            if vis.any():
                dx, dy = xd - xg, yd - yg
            else:  # distance to the box doubled around the ground truth's box
                x, y, w, h = gt["bbox"]
                dx = np.maximum(0, x - w - xd) + np.maximum(0, xd - (x + w * 2))
                dy = np.maximum(0, y - h - yd) + np.maximum(0, yd - (y + h * 2))
            e = (dx ** 2 + dy ** 2) / var / (gt["area"] + np.spacing(1)) / 2
            if vis.any():
                e = e[:, vis]
            ious[:, j] = np.sum(np.exp(-e), axis=1) / e.shape[1]
        return ious

    def images(self) -> list[dict[str, Any]]:
        """The per-image results of evaluate() (no None entries)."""
        return [e for e in self.evalImgs if e is not None]


@dataclass
class Detections:
    """The analysed detections as a pycocotools result object whose keypoints and scores can be set.

    Keypoints (N, 3K) and scores (N,) are the original values, in the order of the result ids 1..N.
    """

    coco: COCO
    keypoints: np.ndarray
    scores: np.ndarray
    anns: list[dict[str, Any]] = field(default_factory=list)
    image_keys: dict = field(default_factory=dict)  # image id -> fingerprint of its detections' current state
    oks_cache: dict = field(default_factory=dict)

    def set(self, keypoints: np.ndarray | None = None, scores: np.ndarray | None = None) -> None:
        """Put these keypoints (N, 3K) and scores (N,) into the result object (None: the originals)."""
        kp = self.keypoints if keypoints is None else keypoints
        sc = self.scores if scores is None else scores
        for i, ann in enumerate(self.anns):
            ann["keypoints"] = kp[i].tolist()
            ann["score"] = float(sc[i])
        rows: dict[Any, list[int]] = {}
        for i, ann in enumerate(self.anns):
            rows.setdefault(ann["image_id"], []).append(i)
        self.image_keys = {img: hashlib.sha1(kp[r].tobytes() + sc[r].tobytes()).digest() for img, r in rows.items()}


def make_detections(coco_gt: COCO, results: Sequence[Mapping[str, Any]], max_dets: int = MAX_DETS) -> Detections:
    """Results (already checked and in canonical order) as :class:`Detections`, at most `max_dets` per
    image (the highest scores first, as the reference's run_analysis keeps them)."""
    kept: list[Mapping[str, Any]] = []
    per_image: dict[int, int] = {}
    for r in results:
        n = per_image.get(r["image_id"], 0)
        if n < max_dets:
            kept.append(copy.deepcopy(dict(r)))
            per_image[r["image_id"]] = n + 1
    coco = COCO()
    coco.dataset = {"images": list(coco_gt.dataset["images"]), "categories": copy.deepcopy(coco_gt.dataset["categories"]),
                    "annotations": []}
    if kept:
        coco = coco_gt.loadRes(kept)
    else:
        coco.createIndex()
    anns = [coco.anns[i] for i in sorted(coco.anns)]
    kpts = np.array([a["keypoints"] for a in anns], dtype=np.float64).reshape(len(anns), -1) if anns else np.zeros((0, 0))
    scores = np.array([a["score"] for a in anns], dtype=np.float64)
    dets = Detections(coco, kpts, scores, anns)
    dets.set()
    return dets


def match(ev: AnalysisEval) -> tuple[list[dict[int, Any]], list[set]]:
    """After evaluate(): per OKS threshold, detection id -> matched ground-truth id, and the matched gt ids."""
    dt_to_gt: list[dict[int, Any]] = [{} for _ in ev.params.iouThrs]
    for e in ev.images():
        for t in range(len(ev.params.iouThrs)):
            for did, gid in zip(e["dtIds"], e["dtMatches"][t]):
                if gid != 0:
                    dt_to_gt[t][did] = gid
    return dt_to_gt, [set(m.values()) for m in dt_to_gt]


def oks_area(ann: Mapping[str, Any], params: AnalysisParams) -> float:
    """The OKS scale of a ground-truth annotation under the protocol (pixels²)."""
    return ann["bbox"][2] * ann["bbox"][3] * BOX_AREA_FACTOR if params.box_area else float(ann["area"])


def find_errors(coco_gt: COCO, dets: Detections, params: AnalysisParams,
                ignore_ids: frozenset = frozenset()) -> list[PersonErrors]:
    """The error kinds of every detection matched at OKS >= 0.1 (original keypoints and scores)."""
    dets.set()
    ev = AnalysisEval(coco_gt, dets, params, [LOCALISATION_OKS], params.max_dets, ignore_ids)
    ev.evaluate()
    k = params.num_keypoints
    out = []
    for did, gid in sorted(match(ev)[0][0].items()):
        gt = coco_gt.anns[gid]
        if gt["num_keypoints"] == 0:
            continue  # nothing to diagnose (the reference skips these too)
        image_anns = [a for a in coco_gt.imgToAnns[gt["image_id"]] if a["id"] != gid]
        own = np.asarray(gt["keypoints"], dtype=np.float64).reshape(k, 3)
        others = np.array([a["keypoints"] for a in image_anns], dtype=np.float64).reshape(-1, k, 3)
        other_areas = np.array([oks_area(a, params) for a in image_anns], dtype=np.float64)
        dt_xy = dets.keypoints[did - 1].reshape(k, 3)[:, :2]
        kinds, ks, fixed = classify(dt_xy, own, oks_area(gt, params), others, other_areas, params)
        labelled = own[:, 2] > 0
        oks = float(np.mean(ks[labelled])) if labelled.any() else 0.0
        out.append(PersonErrors(did - 1, gid, gt["image_id"], kinds, ks, fixed, oks))
    return out


def fixed_keypoints(dets: Detections, errors: Sequence[PersonErrors], kinds: Sequence[int]) -> np.ndarray:
    """The detections' keypoints (N, 3K) with the keypoints of the given error kinds moved to their fixes."""
    kp = dets.keypoints.copy()
    chosen = np.zeros(len(KINDS) + 1, dtype=bool)  # indexed by kind code; the last entry (-1) is UNLABELLED
    chosen[list(kinds)] = True
    for pe in errors:
        row = kp[pe.dt_index].reshape(-1, 3)
        sel = chosen[pe.kinds]
        row[sel, :2] = pe.fixed_xy[sel]
    return kp
