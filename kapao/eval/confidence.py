"""How good are the per-keypoint confidences? Keypoint-level matching to ground truth, ROC AUC, calibration.

The metrics of :mod:`kapao.eval.metrics` score whole poses (OKS ignores keypoint confidences). Here each
predicted pose is matched to a ground-truth person (greedy by score, OKS >= a threshold, as COCOeval
matches), and each keypoint of a matched pair is judged on its own:

* labelled or not: the ground truth's v > 0 (visible or occluded-but-labelled) vs v = 0;
* correct or not: its keypoint similarity ks = exp(-d^2 / (2 s^2 k^2)) >= a threshold (0.5), with d
  the distance to the labelled keypoint in original-image pixels, s^2 the person's area (COCO:
  ``area``; CrowdPose: 0.53 x box width x height) and k = 2 sigma of the keypoint type -- the term
  OKS averages.

:func:`roc_auc` says how well a confidence separates two groups; :func:`reliability` bins
confidences against outcomes (reliability diagram) and gives the expected calibration error.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from kapao.eval.metrics import CROWDPOSE_AREA_FACTOR
from kapao.poses import Poses

MATCH_OKS = 0.5  # a predicted pose counts as a ground-truth person's when OKS >= this
CORRECT_KS = 0.5  # a keypoint is correct when its keypoint similarity >= this


def keypoint_similarity(pred_xy: np.ndarray, gt_xy: np.ndarray, areas: np.ndarray, sigmas: Sequence[float]) -> np.ndarray:
    """Per-keypoint similarity exp(-d^2 / (2 area (2 sigma)^2)), COCOeval's term of OKS.

    pred_xy (P, K, 2), gt_xy (G, K, 2) in the same pixels; areas (G,) in pixels^2; sigmas (K,).
    Returns (P, G, K) in [0, 1].
    """
    k2 = (2 * np.asarray(sigmas, dtype=np.float64)) ** 2
    d2 = ((pred_xy[:, None].astype(np.float64) - gt_xy[None].astype(np.float64)) ** 2).sum(-1)
    return np.exp(-d2 / (2 * k2 * (np.asarray(areas, np.float64)[None, :, None] + np.spacing(1))))


def person_area(ann: dict[str, Any], protocol: str = "coco") -> float:
    """OKS scale s^2 of a ground-truth person: COCO's ``area`` (0.53 x box if absent), CrowdPose's 0.53 x box."""
    w, h = ann["bbox"][2], ann["bbox"][3]
    if protocol == "crowdpose" or "area" not in ann:
        return CROWDPOSE_AREA_FACTOR * w * h
    return float(ann["area"])


@dataclass
class KeypointOutcomes:
    """One row per keypoint of every matched (prediction, ground-truth person) pair; all (M, K)."""

    confidence: np.ndarray  # predicted confidence
    fused: np.ndarray  # bool: fused from a keypoint object
    labelled: np.ndarray  # bool: ground truth v > 0
    similarity: np.ndarray  # keypoint similarity to the labelled keypoint; NaN where not labelled

    @property
    def pairs(self) -> int:
        return self.confidence.shape[0]

    @staticmethod
    def concat(parts: Sequence["KeypointOutcomes"], num_keypoints: int) -> "KeypointOutcomes":
        if not parts:
            z = np.zeros((0, num_keypoints))
            return KeypointOutcomes(z, z.astype(bool), z.astype(bool), z)
        return KeypointOutcomes(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                                  ("confidence", "fused", "labelled", "similarity")))


def match_image(poses: Poses, anns: Iterable[dict[str, Any]], sigmas: Sequence[float], protocol: str = "coco",
                threshold: float = MATCH_OKS) -> KeypointOutcomes:
    """Match the poses of one image to its ground-truth persons and return the matched keypoints.

    Ground truth: non-crowd persons with at least one labelled keypoint (the ones COCOeval scores).
    Poses in descending score each take the unmatched person of highest OKS (mean keypoint
    similarity over the person's labelled keypoints) when it is >= threshold.
    """
    gts = [a for a in anns if not a.get("iscrowd", 0) and any(v > 0 for v in a["keypoints"][2::3])]
    k = poses.num_keypoints
    if not gts or not len(poses):
        return KeypointOutcomes.concat([], k)
    gt = np.array([a["keypoints"] for a in gts], dtype=np.float64).reshape(len(gts), k, 3)
    labelled = gt[..., 2] > 0
    kp = poses.keypoints.detach().float().cpu().numpy()
    ks = keypoint_similarity(kp[..., :2], gt[..., :2], np.array([person_area(a, protocol) for a in gts]), sigmas)
    oks = (ks * labelled[None]).sum(-1) / labelled.sum(-1)[None]  # (P, G)
    taken = np.zeros(len(gts), bool)
    rows: list[tuple[int, int]] = []
    for p in np.argsort(-poses.scores.detach().float().cpu().numpy(), kind="stable"):
        cand = np.where(taken, -1.0, oks[p])
        g = int(cand.argmax())
        if cand[g] >= threshold:
            taken[g] = True
            rows.append((int(p), g))
    if not rows:
        return KeypointOutcomes.concat([], k)
    pi, gi = (np.array(v) for v in zip(*rows))
    fused = poses.fused.detach().cpu().numpy()  # type: ignore[union-attr]  # Poses.__post_init__ always sets fused
    return KeypointOutcomes(kp[pi, :, 2].astype(np.float64), fused[pi], labelled[gi],
                            np.where(labelled[gi], ks[pi, gi], np.nan))


def match_predictions(predictions: Iterable[tuple[Any, Poses]], coco_gt: Any, sigmas: Sequence[float],
                      protocol: str = "coco", threshold: float = MATCH_OKS) -> KeypointOutcomes:
    """:func:`match_image` over (image id, Poses) pairs against a pycocotools COCO ground truth."""
    parts = [match_image(p, coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[image_id])), sigmas, protocol, threshold)
             for image_id, p in predictions]
    return KeypointOutcomes.concat(parts, len(sigmas))


def predict_and_match(predictor: Any, loader: Any, protocol: str = "coco", threshold: float = MATCH_OKS,
                      progress: bool = True) -> KeypointOutcomes:
    """Run a :class:`kapao.infer.predictor.Predictor` over a val loader (:func:`kapao.eval.val.make_val_loader`)
    and match every image's poses to its ground truth as they come (nothing else is kept)."""
    from tqdm import tqdm

    dataset = loader.dataset
    sigmas = dataset.schema.sigmas
    parts = []
    for imgs, _, metas in tqdm(loader, desc="predict + match", unit="batch", disable=not progress, dynamic_ncols=True):
        for meta, poses in zip(metas, predictor(imgs, metas)):
            parts.append(match_predictions([(meta["image_id"], poses)], dataset.coco, sigmas, protocol, threshold))
    return KeypointOutcomes.concat(parts, len(sigmas))


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a random positive > that of a random negative), ties 1/2.

    Mann-Whitney U with average ranks. NaN when either group is empty.
    """
    scores, positive = np.asarray(scores, np.float64).ravel(), np.asarray(positive, bool).ravel()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0  # 1-based average rank of each tie group
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass
class Reliability:
    """Confidence bins [i/B, (i+1)/B) (the last one closed) against the observed rate of success."""

    edges: np.ndarray  # (B + 1,)
    count: np.ndarray  # (B,) keypoints per bin
    confidence: np.ndarray  # (B,) mean confidence per bin (NaN when empty)
    accuracy: np.ndarray  # (B,) fraction correct per bin (NaN when empty)
    ece: float  # expected calibration error: sum over bins of count/N x |accuracy - confidence|


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> Reliability:
    """Reliability diagram data and expected calibration error of confidences in [0, 1]."""
    conf = np.clip(np.asarray(confidence, np.float64).ravel(), 0.0, 1.0)
    ok = np.asarray(correct, bool).ravel()
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.minimum((conf * bins).astype(int), bins - 1)
    count = np.bincount(idx, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, conf, bins) / count
        acc = np.bincount(idx, ok.astype(np.float64), bins) / count
    filled = count > 0
    ece = float((count[filled] / max(len(conf), 1) * np.abs(acc[filled] - mean_conf[filled])).sum())
    return Reliability(edges, count, mean_conf, acc, ece)
