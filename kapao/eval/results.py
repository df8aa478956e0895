"""Evaluating a prediction file without a model: reading a COCO keypoint results file and the ground truth
it is measured against (a dataset YAML's split, or a COCO keypoint annotations JSON given directly).

A COCO annotations JSON needs no images: pycocotools measures OKS from the annotations alone. Only a
YOLO-pose dataset, whose labels are normalised, reads image sizes (from the image headers).
"""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from pycocotools.coco import COCO

from kapao.cfg.dataset import load_dataset_config
from kapao.cfg.schema import KeypointSchema
from kapao.errors import DataError
from kapao.eval.metrics import _quiet


@dataclass
class GroundTruth:
    """The ground truth of an evaluation: the COCO object, its keypoint schema, protocol and images.

    image_dir is None when no image folder is known (a JSON given directly): pictures that need the
    images are then skipped.
    """

    coco: COCO
    schema: KeypointSchema
    protocol: Literal["coco", "crowdpose"]
    source: str
    image_dir: Path | None = None
    name: str = ""


def read_json(path: str | Path, what: str) -> Any:
    """A JSON file's content; DataError naming the file when it is missing, unreadable or not JSON."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"{what} {path} is a folder; give the JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{what} {path}: not a valid JSON file ({e})") from None
    except OSError as e:
        raise DataError(f"cannot read {what} {path}: {e.strerror or e}") from None


def protocol_of(dataset: Mapping[str, Any]) -> Literal["coco", "crowdpose"]:
    """CrowdPose protocol when every image carries a crowdIndex, else COCO (as kapao.eval.val decides)."""
    images = dataset.get("images") or []
    return "crowdpose" if images and all("crowdIndex" in im for im in images) else "coco"


def schema_of(dataset: Mapping[str, Any], where: str) -> KeypointSchema:
    """The keypoint schema of an annotations JSON: from its category's keypoint names (COCO or CrowdPose
    names give those schemas, with flip pairs and sigmas), else from the keypoint count."""
    cats = [c for c in dataset.get("categories") or [] if isinstance(c, dict)]
    names = cats[0].get("keypoints") if cats else None
    anns = [a for a in dataset.get("annotations") or [] if isinstance(a, dict) and a.get("keypoints")]
    count = len(anns[0]["keypoints"]) // 3 if anns else None
    if isinstance(names, list) and names and (count is None or len(names) == count):
        return KeypointSchema.from_names(names)
    if count:
        return KeypointSchema.for_count(count)
    raise DataError(f"{where}: no keypoint names in categories[0].keypoints and no annotation with keypoints; "
                    "cannot tell how many keypoints a person has")


def load_ground_truth(data: str, split: str = "val", *, single_cls: bool = False) -> GroundTruth:
    """The ground truth named by --data: a COCO keypoint annotations JSON, or a dataset config's split."""
    if str(data).lower().endswith(".json"):
        dataset = read_json(data, "annotation file")
        if not isinstance(dataset, dict):
            raise DataError(f"{data}: not a COCO annotation file (needs 'images' and 'annotations' lists)")
        return GroundTruth(_coco(dataset), schema_of(dataset, str(data)), protocol_of(dataset), str(data),
                           name=Path(data).stem)
    cfg = load_dataset_config(data, single_cls=single_cls)
    img_dir, ann_file = cfg.require(split)
    if cfg.yolo is not None:
        from kapao.data.dataset import PoseDataset  # reads the labels and the image sizes

        coco = PoseDataset(cfg, split, 640, augment=False).coco
        return GroundTruth(coco, cfg.schema, protocol_of(coco.dataset), str(data), img_dir, cfg.name)
    dataset = read_json(ann_file, "annotation file")
    if not isinstance(dataset, dict):
        raise DataError(f"{ann_file}: not a COCO annotation file (needs 'images' and 'annotations' lists)")
    return GroundTruth(_coco(dataset), cfg.schema, protocol_of(dataset), str(ann_file), Path(img_dir), cfg.name)


def _coco(dataset: dict[str, Any]) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with _quiet():
        coco.createIndex()
    return coco


def load_predictions(path: str | Path, gt: GroundTruth) -> list[dict[str, Any]]:
    """A COCO keypoint results file (a JSON list of results), checked against the ground truth."""
    results = read_json(path, "predictions file")
    if isinstance(results, dict) and isinstance(results.get("annotations"), list):
        raise DataError(f"{path} is an annotations file, not a results file; give the predictions (a JSON list of "
                        "{image_id, category_id, keypoints, score}) to --predictions")
    if not isinstance(results, list):
        raise DataError(f"{path}: a COCO results file is a JSON list of {{image_id, category_id, keypoints, score}}, "
                        f"got a {type(results).__name__}")
    check_results(results, gt, str(path))
    return results


def check_results(results: Sequence[Any], gt: GroundTruth, where: str) -> None:
    """Every result refers to an image of the ground truth, has 3 x K keypoint values and finite numbers.

    Raises DataError naming `where`, the result's index (0-based, in file order) and what to fix.
    """
    k = gt.schema.num_keypoints
    images = gt.coco.imgs
    for i, r in enumerate(results):
        if not isinstance(r, dict) or not all(key in r for key in ("image_id", "category_id", "keypoints", "score")):
            raise DataError(f"{where}: result #{i} must be a dict with image_id, category_id, keypoints and score")
        kpts, image_id = r["keypoints"], r["image_id"]
        if not isinstance(kpts, list) or len(kpts) != 3 * k:
            n = len(kpts) if isinstance(kpts, list) else "no list of"
            raise DataError(f"{where}: result #{i} (image {image_id!r}) has {n} keypoint values; the ground truth "
                            f"({gt.source}) has {k} keypoints, so 3 x {k} = {3 * k} values [x, y, score] are expected")
        for field in ("keypoints", "score", "bbox"):
            values = r.get(field) if field != "score" else [r["score"]]
            if values is None:
                continue
            if not isinstance(values, list) or not all(_finite(v) for v in values):
                raise DataError(f"{where}: result #{i} (image {image_id!r}) has a {field} value that is not a finite "
                                "number (NaN, inf, text or null); fix or drop that result")
        if image_id not in images:
            raise DataError(f"{where}: result #{i} refers to image_id {image_id!r}, which is not in the ground truth "
                            f"({gt.source}); were the predictions made on another split or dataset?")


def _finite(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
