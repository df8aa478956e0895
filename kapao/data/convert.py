"""`kapao convert`: COCO keypoint JSON <-> Ultralytics YOLO-pose txt labels, to take data to or from other tools.

* :func:`coco_to_yolo` writes `OUT/images/<split>/` (links to the images, or copies), one
  `OUT/labels/<split>/<name>.txt` per image (`0 cx cy w h x1 y1 v1 …`, normalised to the JSON's
  width/height, 6 decimals, clipped into [0, 1] as Ultralytics requires) and `OUT/data.yaml` (kpt_shape,
  flip_idx, names, kpt_names, plus kapao's sigmas, skeleton and kp_bbox). Crowd annotations are left
  out (YOLO has no crowd regions); images without persons get an empty file (negatives).
* :func:`yolo_to_coco` writes `OUT/annotations/<split>.json` (file names relative to the dataset
  root, bbox [x, y, w, h] and keypoints in pixels, area = 0.53 x box area since YOLO labels carry no
  segmentation area) and a kapao dataset YAML `OUT/data.yaml` that reads the images where they are.

COCO -> YOLO -> COCO gives back every kept box and keypoint to rounding (1e-6 of the image size).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tqdm import tqdm

from kapao.cfg.schema import BOX_AREA_FACTOR, SPLITS, DatasetConfig
from kapao.data.labels import read_coco
from kapao.data.sources import probe_image
from kapao.data.yolo_labels import read_label_file, row_annotations, split_files
from kapao.errors import ConfigError, DataError
from kapao.runtime import atomic_write

LOGGER = logging.getLogger(__name__)
DECIMALS = 6


@dataclass
class ConvertResult:
    """What a conversion wrote: the new dataset YAML and counts per split."""

    yaml_path: Path
    images: dict[str, int] = field(default_factory=dict)
    persons: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)  # crowd annotations / unreadable images left out
    clipped: int = 0  # coordinates clipped into the image (COCO -> YOLO)

    def summary(self) -> str:
        parts = [f"{s}: {self.images[s]} images, {self.persons[s]} persons"
                 + (f", {self.skipped[s]} left out" if self.skipped.get(s) else "") for s in self.images]
        clip = f"; {self.clipped} coordinates clipped into the image" if self.clipped else ""
        return "; ".join(parts) + clip


def _prepare_out(out: Path) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not an empty folder; choose a new folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create {out}: {e.strerror or e}; choose a writable folder") from None
    return out


def _write_yaml(path: Path, data: dict[str, Any]) -> Path:
    with atomic_write(path, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False, allow_unicode=True, default_flow_style=None)
    return path


# ----------------------------------------------------------------------------------------------
def coco_rows(ann: dict[str, Any], width: int, height: int, k: int) -> tuple[str, int]:
    """One COCO annotation as a YOLO-pose row `0 cx cy w h x1 y1 v1 …` normalised to (width, height);
    and how many coordinates had to be clipped into [0, 1]."""
    x, y, w, h = (float(v) for v in ann["bbox"])
    box = np.array([x, y, x + w, y + h]) / [width, height, width, height]
    kp = np.array(ann.get("keypoints") or [0.0] * 3 * k, np.float64).reshape(k, 3)
    kp[kp[:, 2] <= 0] = 0.0
    kp[:, :2] /= [width, height]
    clipped = int(((box < 0) | (box > 1)).sum() + ((kp[:, :2] < 0) | (kp[:, :2] > 1)).sum())
    box, kp[:, :2] = box.clip(0, 1), kp[:, :2].clip(0, 1)
    values = [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2, box[2] - box[0], box[3] - box[1]]
    text = " ".join(f"{v:.{DECIMALS}f}" for v in values)
    text += "".join(f" {a:.{DECIMALS}f} {b:.{DECIMALS}f} {int(v)}" for a, b, v in kp)
    return "0 " + text, clipped


def _place_image(src: Path, dst: Path, copy: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if copy:
        shutil.copy2(src, dst)
    else:
        os.symlink(src.resolve(), dst)


def coco_to_yolo(cfg: DatasetConfig, out: str | os.PathLike, *, copy_images: bool = False,
                 splits: tuple[str, ...] | None = None) -> ConvertResult:
    """Write a COCO-format dataset (every split with annotations, or `splits`) in the YOLO-pose layout."""
    if cfg.yolo is not None:
        raise ConfigError(f"{cfg.source} is already a YOLO-pose dataset; convert it with --to coco")
    out = _prepare_out(Path(out))
    k, schema = cfg.schema.num_keypoints, cfg.schema
    res = ConvertResult(out / "data.yaml")
    for split in splits or [s for s in SPLITS if s in cfg.annotations]:
        img_dir, ann_file = cfg.require(split)
        coco = read_coco(ann_file)
        persons_cat = {c["id"] for c in coco.dataset.get("categories", []) if c.get("keypoints")} or None
        res.images[split] = res.persons[split] = res.skipped[split] = 0
        for info in tqdm(coco.dataset["images"], desc=f"convert {split}", unit="img", leave=False):
            rel = Path(info["file_name"])
            src = img_dir / rel
            if not src.is_file():
                res.skipped[split] += 1
                LOGGER.warning("%s not found; left out", src)
                continue
            rows = []
            for a in coco.imgToAnns.get(info["id"], []):
                if persons_cat is not None and a.get("category_id") not in persons_cat:
                    continue
                if a.get("iscrowd", 0):
                    res.skipped[split] += 1
                    continue
                row, clipped = coco_rows(a, int(info["width"]), int(info["height"]), k)
                rows.append(row)
                res.clipped += clipped
            _place_image(src, out / "images" / split / rel, copy_images)
            label = (out / "labels" / split / rel).with_suffix(".txt")
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
            res.images[split] += 1
            res.persons[split] += len(rows)
    _write_yaml(res.yaml_path, {
        "path": ".", **{s: f"images/{s}" for s in res.images}, "kpt_shape": [k, 3],
        "flip_idx": list(schema.flip_index), "names": {0: "person"}, "kpt_names": {0: list(schema.names)},
        "skeleton": [list(e) for e in schema.skeleton], "sigmas": list(schema.sigmas), "kp_bbox": schema.kp_bbox})
    return res


# ----------------------------------------------------------------------------------------------
def yolo_to_coco(cfg: DatasetConfig, out: str | os.PathLike,
                 splits: tuple[str, ...] | None = None) -> ConvertResult:
    """Write a YOLO-pose dataset's labels as COCO keypoint JSON (one per split) plus a kapao YAML."""
    if cfg.yolo is None:
        raise ConfigError(f"{cfg.source} is already a COCO-format dataset; convert it with --to yolo")
    out = _prepare_out(Path(out))
    schema, y = cfg.schema, cfg.yolo
    res = ConvertResult(out / "data.yaml")
    category = {"id": 1, "name": "person", "supercategory": "person", "keypoints": list(schema.names),
                "skeleton": [[a + 1, b + 1] for a, b in schema.skeleton]}
    doc: dict[str, Any] = {"name": cfg.name, "path": str(cfg.root)}
    for split in splits or list(y.sources):
        files = split_files(cfg, split)
        images: list[dict[str, Any]] = []
        anns: list[dict[str, Any]] = []
        res.skipped[split] = 0
        for n, (img, lab) in enumerate(tqdm(list(zip(files.images, files.labels)), desc=f"convert {split}",
                                            unit="img", leave=False), 1):
            status, _, hw = probe_image(img)
            if status != "ok":
                res.skipped[split] += 1
                LOGGER.warning("%s is %s; left out", img, status)
                continue
            rows = read_label_file(lab, schema.num_keypoints, y.ndim, len(y.classes), y.single_cls)
            if rows.problems:
                raise DataError(f"{rows.problems[0]}; `kapao check --data {cfg.source}` lists every problem")
            rel = os.path.relpath(img, cfg.root) if img.is_relative_to(cfg.root) else str(img)
            images.append({"id": n, "file_name": rel, "height": hw[0], "width": hw[1]})
            for a in row_annotations(rows, hw):
                kp = a["keypoints"]
                kp[2::3] = [int(v) for v in kp[2::3]]
                anns.append({"id": len(anns) + 1, "image_id": n, "category_id": 1, "iscrowd": 0, "bbox": a["bbox"],
                             "area": a["bbox"][2] * a["bbox"][3] * BOX_AREA_FACTOR, "keypoints": kp,
                             "num_keypoints": sum(v > 0 for v in kp[2::3])})
        path = out / "annotations" / f"{split}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "w") as f:
            json.dump({"images": images, "annotations": anns, "categories": [category]}, f)
        doc.update({split: ".", f"{split}_annotations": str(path.resolve())})
        res.images[split], res.persons[split] = len(images), len(anns)
    _write_yaml(res.yaml_path, {**doc, **schema.to_dict()})
    return res
