"""Keypoint metrics: the COCO protocol (pycocotools) and the CrowdPose protocol (crowdpose-api).

Both run on pycocotools' ``COCOeval`` so that OKS matching is the official code, not a copy:

* ``coco``: ``COCOeval(iouType="keypoints")`` with the dataset's sigmas, exactly as the COCO
  keypoint evaluation is run officially; the stats AP, AP50, AP75, APm, APl, AR, AR50, AR75, ARm, ARl.
* ``crowdpose``: :class:`CrowdPoseEval`, a ``COCOeval`` configured as the official crowdpose-api
  (github.com/Jeff-sjtu/CrowdPose, ``crowdpose-api/PythonAPI/crowdposetools/cocoeval.py``) evaluates:
  the OKS scale of a ground-truth person is 0.53 x the width x height of its GT box (the files carry
  no ``area``), maxDets 20, one area range (all); AP/AR at IoU 0.50:0.95, 0.50 and 0.75, then
  AP(easy/medium/hard) on the images split by ``images[].crowdIndex`` (< 0.2, < 0.8, the rest), each
  from its own evaluate()/accumulate() and equal to the mean of ``precision[:, :, :, 0, :]`` rounded
  to 4 decimals with the -1 entries left in (-1 for an empty subset), as the official tool prints.
  The ignore rule (``iscrowd`` or the stored ``num_keypoints`` == 0), the crowd matching and the
  accumulation are the same code in both tools, so they are inherited unchanged.

Results are COCO keypoint result dicts (``Poses.to_coco``): image_id, category_id, keypoints
[x, y, c]*K in original-image pixels, score, and optionally bbox [x, y, w, h].

pycocotools breaks ties between equal scores by input order, so the same predictions in another
order can give other numbers. Results are therefore put in one canonical order first
(:func:`sort_results`: score high to low, then keypoints, then box); :func:`save_results` writes that
same order, so the official tools run on the saved file print exactly the numbers returned here.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import numbers
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Sequence, TypeAlias

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from kapao.cfg.schema import BOX_AREA_FACTOR, KeypointSchema
from kapao.data.labels import validate_coco
from kapao.errors import ConfigError, DataError
from kapao.runtime import atomic_write, plain_data

LOGGER = logging.getLogger(__name__)
PROTOCOLS = ("coco", "crowdpose")
COCO_METRICS = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")
CROWDPOSE_METRICS = ("AP", "AP50", "AP75", "AR", "AR50", "AR75", "AP_easy", "AP_medium", "AP_hard")

MAX_DETS = 20  # both protocols: at most 20 poses per image are evaluated
CROWDPOSE_AREA_FACTOR = BOX_AREA_FACTOR  # crowdpose-api: OKS scale (and area) of a GT person = 0.53 * w * h of its box
CROWD_INDEX_SPLIT = (0.2, 0.8)  # crowdpose-api: easy < 0.2 <= medium < 0.8 <= hard
CROWDPOSE_SUBSETS = ("easy", "medium", "hard")

GroundTruth: TypeAlias = "str | os.PathLike | COCO"


# ----------------------------------------------------------------------------------------------
# Public API
def evaluate(gt: GroundTruth, results: Sequence[Mapping[str, Any]],
             schema_or_sigmas: KeypointSchema | Sequence[float],
             protocol: Literal["coco", "crowdpose"] = "coco",
             image_ids: Sequence[Any] | None = None) -> dict[str, float]:
    """Metrics of `results` against the keypoint annotations `gt` under `protocol`.

    `schema_or_sigmas` gives the OKS sigmas (one per keypoint), as a schema or a plain sequence.
    `image_ids` restricts the evaluation to those images (default: every image of `gt`); results
    for other images are then not counted.
    """
    sigmas = schema_or_sigmas.sigmas if isinstance(schema_or_sigmas, KeypointSchema) else schema_or_sigmas
    if protocol == "coco":
        return evaluate_coco(gt, results, sigmas, image_ids)
    if protocol == "crowdpose":
        return evaluate_crowdpose(gt, results, sigmas, image_ids)
    raise ConfigError(f"unknown evaluation protocol {protocol!r}; choose one of: {', '.join(PROTOCOLS)}")


def evaluate_coco(gt: GroundTruth, results: Sequence[Mapping[str, Any]], sigmas: Sequence[float],
                  image_ids: Sequence[Any] | None = None) -> dict[str, float]:
    """COCO keypoint metrics (keys :data:`COCO_METRICS`), as pycocotools' COCOeval prints them.

    -1 means "no ground truth to measure" (e.g. APm on a set without medium-size persons).
    """
    sig = _check_sigmas(sigmas)
    coco_gt = _load_gt(gt, len(sig), protocol="coco")
    coco_dt = _load_results(coco_gt, results, len(sig))
    ev = COCOeval(coco_gt, coco_dt, iouType="keypoints")
    ev.params.kpt_oks_sigmas = sig
    if image_ids is not None:
        ev.params.imgIds = _check_image_ids(image_ids, coco_gt)
    with _quiet():
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: float(v) for k, v in zip(COCO_METRICS, ev.stats)}


def evaluate_crowdpose(gt: GroundTruth, results: Sequence[Mapping[str, Any]], sigmas: Sequence[float],
                       image_ids: Sequence[Any] | None = None) -> dict[str, float]:
    """CrowdPose metrics (keys :data:`CROWDPOSE_METRICS`), the numbers the official crowdpose-api prints.

    The ground truth needs ``images[].crowdIndex``. With `image_ids`, each crowd subset is the
    subset's images among `image_ids`. AP_easy/medium/hard are -1 for a subset without images.
    """
    sig = _check_sigmas(sigmas)
    coco_gt = _load_gt(gt, len(sig), protocol="crowdpose")
    coco_dt = _load_results(coco_gt, results, len(sig))
    ev = CrowdPoseEval(coco_gt, coco_dt, sig)
    if image_ids is not None:
        ev.params.imgIds = _check_image_ids(image_ids, coco_gt)
    return ev.run()


def format_metrics(metrics: Mapping[str, float]) -> str:
    """The metrics as a table, one line per metric in the style of COCOeval.summarize()."""
    lines = []
    for key, value in metrics.items():
        label = _LABELS.get(key)
        if label is None:
            lines.append(f" {key:<58} = {value:0.3f}")
            continue
        title, iou, field, rng = label
        kind = "(AP)" if title == "Average Precision" else "(AR)"
        lines.append(f" {title:<18} {kind} @[ IoU={iou:<9} | {field}={rng:>6s} | maxDets={MAX_DETS:>3d} ] = {value:0.3f}")
    return "\n".join(lines)


def sort_results(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Checked copies of keypoint results in the canonical order (score high to low, then keypoints, box).

    Each copy holds image_id, category_id, keypoints (floats), score and bbox [x, y, w, h]; a
    missing or empty bbox becomes the keypoints' extent, which is the box (and area) pycocotools'
    loadRes gives results without one, so the metrics do not change.
    """
    out = [_normalise_result(i, r) for i, r in enumerate(results)]
    out.sort(key=lambda r: (-r["score"], r["keypoints"], r["bbox"]))
    return out


def save_results(results: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write results as a COCO results JSON in the canonical order, atomically; returns the path.

    The official tools run on this file print the numbers :func:`evaluate` returns.
    """
    path = Path(path)
    data = sort_results(results)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot write {path}: {e.strerror or e}; choose a writable folder") from None
    try:
        with atomic_write(path, "w") as f:
            json.dump(data, f)
    except OSError as e:
        raise DataError(f"cannot write {path}: {e.strerror or e}; free disk space or choose another "
                        "folder") from None
    return path


# ----------------------------------------------------------------------------------------------
# CrowdPose protocol on pycocotools
class CrowdPoseEval(COCOeval):
    """pycocotools' COCOeval set up as the official crowdpose-api's COCOeval.

    Differences from COCO, all from crowdpose-api ``cocoeval.py``: GT area (the OKS scale in
    computeOks and the area-range test in evaluateImg) is 0.53 * w * h of the GT box, whatever the
    file holds; maxDets [20]; the summary adds AP per crowdIndex subset (see :meth:`subset_ap`).
    The official Params also list 'medium' and 'large' area ranges, but none of the printed
    numbers uses them, so only 'all' is evaluated here.
    """

    def __init__(self, coco_gt: COCO, coco_dt: COCO, sigmas: Sequence[float] | np.ndarray) -> None:
        super().__init__(coco_gt, coco_dt, iouType="keypoints")
        p = self.params
        p.kpt_oks_sigmas = np.asarray(sigmas, dtype=np.float64)
        p.maxDets = [MAX_DETS]
        p.areaRng = [[0 ** 2, 1e5 ** 2]]
        p.areaRngLbl = ["all"]

    def _prepare(self) -> None:
        super()._prepare()  # ignore = iscrowd or stored num_keypoints == 0: the same rule as crowdpose-api
        for gts in self._gts.values():
            for g in gts:
                g["area"] = g["bbox"][2] * g["bbox"][3] * CROWDPOSE_AREA_FACTOR

    def crowd_subsets(self) -> dict[str, list[Any]]:
        """Image ids of the easy / medium / hard subsets among the images being evaluated."""
        first, second = CROWD_INDEX_SPLIT
        chosen = set(self.params.imgIds)
        subsets: dict[str, list[Any]] = {name: [] for name in CROWDPOSE_SUBSETS}
        for img in self.cocoGt.dataset["images"]:
            if img["id"] not in chosen:
                continue
            ci = img["crowdIndex"]
            subsets["easy" if ci < first else "medium" if ci < second else "hard"].append(img["id"])
        return subsets

    def subset_ap(self, img_ids: Sequence[Any]) -> float:
        """AP of one subset: a fresh evaluate() + accumulate() on its images, mean precision of area
        range 'all' with the -1 entries kept, rounded to 4 decimals (-1.0 for no images)."""
        self.params.imgIds = list(img_ids)
        self.evaluate()
        self.accumulate()
        return round(float(np.mean(self.eval["precision"][:, :, :, 0, :])), 4)

    def run(self) -> dict[str, float]:
        """evaluate(), accumulate() and the CrowdPose summary, without pycocotools' prints."""
        with _quiet():
            subsets = self.crowd_subsets()
            self.evaluate()
            self.accumulate()
            out = {
                "AP": self._summary(ap=True), "AP50": self._summary(ap=True, iou=0.5),
                "AP75": self._summary(ap=True, iou=0.75), "AR": self._summary(ap=False),
                "AR50": self._summary(ap=False, iou=0.5), "AR75": self._summary(ap=False, iou=0.75),
            }
            for name in CROWDPOSE_SUBSETS:
                out[f"AP_{name}"] = self.subset_ap(subsets[name])
        self.stats = np.array([out[k] for k in CROWDPOSE_METRICS])
        return out

    def _summary(self, *, ap: bool, iou: float | None = None) -> float:
        """crowdpose-api's _summarize for area 'all', maxDets 20: mean over the entries > -1, else -1."""
        p = self.params
        if ap:
            s = self.eval["precision"]  # (T, R, K, A, M)
            if iou is not None:
                s = s[np.where(np.abs(iou - p.iouThrs) < 0.01)[0]]
            s = s[:, :, :, 0, 0]
        else:
            s = self.eval["recall"]  # (T, K, A, M)
            if iou is not None:
                s = s[np.where(iou == p.iouThrs)[0]]
            s = s[:, :, 0, 0]
        valid = s[s > -1]
        return float(np.mean(valid)) if valid.size else -1.0


# ----------------------------------------------------------------------------------------------
# Loading and checking
@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Swallow pycocotools' progress prints."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _check_sigmas(sigmas: Sequence[float]) -> np.ndarray:
    sig = np.asarray(list(sigmas), dtype=np.float64)
    if sig.ndim != 1 or sig.size == 0 or not np.all(np.isfinite(sig)) or np.any(sig <= 0):
        raise ConfigError(f"OKS sigmas must be a non-empty list of positive numbers, got {list(sigmas)}")
    return sig


def _check_image_ids(image_ids: Sequence[Any], coco_gt: COCO) -> list[Any]:
    ids = list(image_ids)
    unknown = [i for i in ids if i not in coco_gt.imgs]
    if unknown:
        raise DataError(f"image ids not in the ground truth: {', '.join(map(repr, unknown[:5]))}"
                        f"{' ...' if len(unknown) > 5 else ''}")
    return ids


def _load_gt(gt: GroundTruth, num_keypoints: int, *, protocol: str) -> COCO:
    """A private, checked COCO object of the ground truth (pycocotools writes flags into it)."""
    if isinstance(gt, COCO):
        dataset, where = copy.deepcopy(gt.dataset), "ground truth"
    else:
        where = str(gt)
        try:
            with open(gt, encoding="utf-8") as f:
                dataset = json.load(f)
        except FileNotFoundError:
            raise DataError(f"annotation file not found: {where}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{where}: not a valid JSON file ({e})") from None
    if not isinstance(dataset, dict) or not isinstance(dataset.get("annotations"), list):
        raise DataError(f"{where}: not a COCO annotation file (needs 'images' and 'annotations' lists)")
    validate_coco(dataset, where, num_keypoints)  # every path to the metrics passes here, COCO objects too
    _complete_gt(dataset, num_keypoints, protocol=protocol, where=where)
    if not any(not a.get("iscrowd") for a in dataset["annotations"]):
        LOGGER.warning("%s: no person to evaluate (%s); every metric is -1 (undefined), not a score", where,
                       "all annotations are iscrowd=1" if dataset["annotations"] else "no annotations")
    coco = COCO()
    coco.dataset = dataset
    with _quiet():
        coco.createIndex()
    return coco


def _complete_gt(dataset: dict[str, Any], num_keypoints: int, *, protocol: str, where: str) -> None:
    """Check annotations in place and fill the fields pycocotools needs but custom files may lack."""
    missing_area = 0
    for img in dataset["images"]:
        if "id" not in img:
            raise DataError(f"{where}: an image entry has no 'id'")
        if protocol == "crowdpose" and not isinstance(img.get("crowdIndex"), numbers.Real):
            raise DataError(f"{where}: image {img['id']!r} has no 'crowdIndex'; the CrowdPose protocol needs "
                            "images[].crowdIndex (use the COCO protocol for other datasets)")
    for ann in dataset["annotations"]:
        if "keypoints" not in ann:
            raise DataError(f"{where}: annotation {ann['id']!r} has no 'keypoints'")
        ann.setdefault("iscrowd", 0)
        ann.setdefault("num_keypoints", int(sum(v > 0 for v in ann["keypoints"][2::3])))
        if "area" not in ann and protocol == "coco":
            # COCO's area is the segmentation area; 0.53 of the box is crowdpose-api's stand-in for it
            ann["area"] = ann["bbox"][2] * ann["bbox"][3] * CROWDPOSE_AREA_FACTOR
            missing_area += 1
    if missing_area:
        warnings.warn(f"{where}: {missing_area} annotation(s) have no 'area'; using {CROWDPOSE_AREA_FACTOR} x box "
                      "area as the OKS scale (as the CrowdPose tools do)", stacklevel=4)
    if not dataset.get("categories"):
        cat_ids = sorted({a["category_id"] for a in dataset["annotations"]}) or [1]
        dataset["categories"] = [{"id": c, "name": "person" if c == 1 else str(c)} for c in cat_ids]


def _load_results(coco_gt: COCO, results: Sequence[Mapping[str, Any]], num_keypoints: int) -> COCO:
    """pycocotools' result object for the results in canonical order; an empty one for no results."""
    dts = sort_results(results)
    for r in dts:
        if len(r["keypoints"]) != 3 * num_keypoints:
            raise DataError(f"a result for image {r['image_id']!r} has {len(r['keypoints'])} keypoint values, "
                            f"expected {3 * num_keypoints} (3 x {num_keypoints} keypoints)")
        if r["image_id"] not in coco_gt.imgs:
            raise DataError(f"a result refers to image_id {r['image_id']!r}, which is not in the ground truth")
    with _quiet():
        if dts:
            return coco_gt.loadRes(dts)
        res = COCO()  # loadRes cannot take an empty list
        res.dataset = {"images": list(coco_gt.dataset["images"]),
                       "categories": copy.deepcopy(coco_gt.dataset["categories"]), "annotations": []}
        res.createIndex()
    return res


def _normalise_result(i: int, r: Mapping[str, Any]) -> dict[str, Any]:
    try:
        image_id, category_id, kpts, score = r["image_id"], r["category_id"], r["keypoints"], r["score"]
    except (KeyError, TypeError):
        raise DataError(f"result #{i} must be a dict with image_id, category_id, keypoints and score") from None
    try:
        kpts = [float(v) for v in kpts]
        score = float(score)
        bbox = [float(v) for v in (r.get("bbox") or [])]
    except (TypeError, ValueError):
        raise DataError(f"result #{i}: keypoints, score and bbox must be numbers") from None
    if not kpts or len(kpts) % 3:
        raise DataError(f"result #{i}: keypoints must be [x, y, c] * K, got {len(kpts)} values")
    if not math.isfinite(score):
        raise DataError(f"result #{i}: score must be finite, got {score}")
    if not bbox:
        x, y = kpts[0::3], kpts[1::3]
        bbox = [min(x), min(y), max(x) - min(x), max(y) - min(y)]
    elif len(bbox) != 4:
        raise DataError(f"result #{i}: bbox must be [x, y, w, h], got {len(bbox)} values")
    try:  # numpy integers -> int, so that ids hash like the ground truth's and serialise to JSON
        image_id, category_id = plain_data(image_id, "image_id"), plain_data(category_id, "category_id")
    except TypeError as e:
        raise DataError(f"result #{i}: {e}; ids must be numbers or strings") from None
    return {"image_id": image_id, "category_id": category_id, "keypoints": kpts, "score": score, "bbox": bbox}


_IOU_ALL = "0.50:0.95"
_LABELS: dict[str, tuple[str, str, str, str]] = {  # key -> (title, IoU, range field, range label)
    "AP": ("Average Precision", _IOU_ALL, "area", "all"),
    "AP50": ("Average Precision", "0.50", "area", "all"),
    "AP75": ("Average Precision", "0.75", "area", "all"),
    "APm": ("Average Precision", _IOU_ALL, "area", "medium"),
    "APl": ("Average Precision", _IOU_ALL, "area", "large"),
    "AR": ("Average Recall", _IOU_ALL, "area", "all"),
    "AR50": ("Average Recall", "0.50", "area", "all"),
    "AR75": ("Average Recall", "0.75", "area", "all"),
    "ARm": ("Average Recall", _IOU_ALL, "area", "medium"),
    "ARl": ("Average Recall", _IOU_ALL, "area", "large"),
    **{f"AP_{s}": ("Average Precision", _IOU_ALL, "type", s) for s in CROWDPOSE_SUBSETS},
}
