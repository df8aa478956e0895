"""Ultralytics YOLO-pose labels: one labels/…/*.txt file per image, read into :class:`kapao.data.labels.Labels`.

Each image's labels are found by Ultralytics' rule (the last `/images/` of the image path becomes
`/labels/`, the suffix `.txt`), one row per object: `class cx cy w h x1 y1 [v1] … xK yK [vK]`, all
normalised to the image's width/height (EXIF orientation applied, as Ultralytics reads it). The YAML
that names the images is read by :mod:`kapao.cfg.yolo`.

Rows become the same per-image label arrays as COCO input, through the same per-annotation rules
(:func:`kapao.data.labels.parse_annotation`): boxes clipped to the image, persons without labelled
keypoints kept as box-only pose objects, images without rows kept as negatives, keypoints slightly
outside clipped in. Without a visibility column a keypoint is labelled (v = 2) when it lies inside the
image and is not exactly (0, 0), the placeholder exporters write for a missing keypoint. Parsed labels
are cached like COCO labels (key: :func:`cache_key`).

For evaluation the ground truth is built in memory (:func:`ground_truth`); YOLO labels carry no
segmentation area, so a person's OKS area is 0.53 x its box area (:data:`kapao.cfg.schema.BOX_AREA_FACTOR`),
the convention of Ultralytics and the CrowdPose tools.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from kapao.cfg.schema import BOX_AREA_FACTOR, IMAGE_SUFFIXES, DatasetConfig, KeypointSchema
from kapao.data.labels import CACHE_VERSION, DatasetStats, Labels, cache_paths, load_cached, parse_annotation, save_cached
from kapao.data.sources import probe_image
from kapao.errors import ConfigError, DataError

OKS_AREA_NOTE = (f"YOLO labels have no segmentation area: OKS area = {BOX_AREA_FACTOR} x box area "
                 "(the Ultralytics / CrowdPose convention)")
COORD_TOLERANCE = 0.01  # Ultralytics accepts normalised coordinates up to 1.01


def image_files(sources: Sequence[Path], root: Path) -> list[Path]:
    """Image paths of a split, sorted: folders searched recursively, .txt lists read one path a line
    (`./x` relative to the list's folder, as Ultralytics; other relative lines under the root, else
    the list's folder). DataError naming a source that does not exist."""
    found: list[Path] = []
    for src in sources:
        if src.is_dir():
            found += [p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
        elif src.is_file():
            found += [_list_entry(line.strip(), src, root) for line in
                      src.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
        else:
            raise DataError(f"{src} not found: check 'path' and the split entries of the dataset YAML")
    return sorted({p for p in found if p.suffix.lower() in IMAGE_SUFFIXES}, key=str)


def _list_entry(line: str, list_file: Path, root: Path) -> Path:
    p = Path(line).expanduser()
    if p.is_absolute():
        return p
    if line.startswith("./"):
        return Path(os.path.abspath(list_file.parent / p))  # not resolve(): a linked image keeps its labels/ path
    return Path(os.path.abspath(next((c for c in (root / p, list_file.parent / p) if c.exists()), root / p)))


def label_files(images: Sequence[Path]) -> list[Path]:
    """The label txt of each image by Ultralytics' rule (last /images/ -> /labels/, suffix .txt)."""
    from ultralytics.data.utils import img2label_paths  # ultralytics is heavy: only when YOLO data is read

    return [Path(p) for p in img2label_paths([str(p) for p in images])]


@dataclass
class LabelProblem:
    """One wrong row or file: where (file, 1-based line or 0 for the file) and what."""

    file: Path
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.file}{f':{self.line}' if self.line else ''}: {self.what}"


@dataclass
class LabelRows:
    """The rows of one label file, checked: class ids (n,), boxes (n, 4) cx, cy, w, h and keypoints
    (n, K, ndim), all normalised; `outside` counts values beyond [0, 1] (+ tolerance)."""

    classes: np.ndarray
    boxes: np.ndarray
    keypoints: np.ndarray
    missing: bool = False  # no label file (the image is a negative)
    outside: int = 0
    problems: list[LabelProblem] = field(default_factory=list)


def read_label_file(path: Path, k: int, ndim: int, num_classes: int, single_cls: bool = False) -> LabelRows:
    """Parse and check one label file; wrong rows are left out and described in `problems`."""
    width = 5 + k * ndim
    empty = LabelRows(np.zeros(0, np.int64), np.zeros((0, 4), np.float32), np.zeros((0, k, ndim), np.float32))
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        empty.missing = True
        return empty
    except (OSError, UnicodeDecodeError) as e:
        empty.problems.append(LabelProblem(path, 0, f"cannot read the label file ({e}); fix or delete it"))
        return empty
    rows, problems = [], []
    for i, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != width:
            problems.append(LabelProblem(path, i, f"{len(parts)} values, expected {width} (class, 4 box values and "
                                         f"{k} keypoints x {ndim} for kpt_shape [{k}, {ndim}]); fix the row or kpt_shape"))
            continue
        try:
            row = np.array([float(v) for v in parts], np.float64)
        except ValueError:
            problems.append(LabelProblem(path, i, "a value is not a number; fix the row"))
            continue
        if not np.isfinite(row).all() or row[0] < 0 or row[0] % 1:
            problems.append(LabelProblem(path, i, f"class id {parts[0]} is not a non-negative integer; fix the row"))
        elif not single_cls and row[0] >= num_classes:
            problems.append(LabelProblem(path, i, f"class id {int(row[0])} is out of range: the YAML's names has "
                                         f"{num_classes} class(es), ids 0..{num_classes - 1}; fix the row or 'names'"))
        else:
            rows.append(row)
    a = np.array(rows, np.float64).reshape(-1, width)
    coords = np.concatenate([a[:, 1:5], a[:, 5:].reshape(len(a), k, ndim)[..., :2].reshape(len(a), 2 * k)], 1)
    outside = int(((coords < -COORD_TOLERANCE) | (coords > 1 + COORD_TOLERANCE)).any(1).sum())
    return LabelRows(a[:, 0].astype(np.int64), a[:, 1:5].astype(np.float32),
                     a[:, 5:].reshape(len(a), k, ndim).astype(np.float32), False, outside, problems)


def row_annotations(rows: LabelRows, hw: tuple[int, int]) -> list[dict[str, Any]]:
    """Rows as COCO-style annotations in pixels of an image of size hw = (h, w): bbox [x, y, w, h] and
    keypoints [x, y, v] * K (v = 2 for a 2-value keypoint inside the image and not at (0, 0), else 0)."""
    h, w = hw
    out = []
    for b, kp in zip(rows.boxes.astype(np.float64), rows.keypoints.astype(np.float64)):
        if kp.shape[1] == 2:
            inside = (kp[:, 0] >= 0) & (kp[:, 0] <= 1) & (kp[:, 1] >= 0) & (kp[:, 1] <= 1)
            kp = np.concatenate([kp, np.where(inside & (kp != 0).any(1), 2.0, 0.0)[:, None]], 1)
        kp = kp * np.array([w, h, 1.0])
        out.append({"bbox": [(b[0] - b[2] / 2) * w, (b[1] - b[3] / 2) * h, b[2] * w, b[3] * h],
                    "keypoints": kp.reshape(-1).tolist()})
    return out


# ----------------------------------------------------------------------------------------------
# Labels of a split
@dataclass
class SplitFiles:
    """The files of one split: images (sorted), their label files, the .txt lists read."""

    images: list[Path]
    labels: list[Path]
    lists: list[Path]


def split_files(cfg: DatasetConfig, split: str) -> SplitFiles:
    """Images and label files of a split of a YOLO-format dataset (DataError if a source is missing)."""
    assert cfg.yolo is not None, "split_files needs a YOLO-format DatasetConfig"
    if split not in cfg.yolo.sources:
        have = ", ".join(cfg.yolo.sources) or "none"
        raise ConfigError(f"dataset {cfg.name} ({cfg.source}) has no '{split}' split; it has: {have}")
    sources = cfg.yolo.sources[split]
    images = image_files(sources, cfg.root)
    return SplitFiles(images, label_files(images), [s for s in sources if s.is_file()])


def _relative(p: Path, root: Path) -> str:
    """p relative to root when under it (labels stay valid if the dataset moves), else absolute."""
    try:
        return str(p.relative_to(root))
    except ValueError:
        return str(p)


def parse_split(cfg: DatasetConfig, files: SplitFiles, workers: int = 8,
                problems: list[LabelProblem] | None = None) -> Labels:
    """Labels of a split parsed from its txt files (images probed in threads).

    Wrong rows are collected in `problems` when given (kapao check); otherwise the first one raises a
    DataError naming the file and line.
    """
    assert cfg.yolo is not None
    k, y = cfg.schema.num_keypoints, cfg.yolo

    def one(i: int) -> tuple[tuple[str, tuple[int, int], tuple[int, int]], LabelRows]:
        return probe_image(files.images[i]), read_label_file(files.labels[i], k, y.ndim, len(y.classes), y.single_cls)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        jobs = pool.map(one, range(len(files.images)))
        parsed = list(tqdm(jobs, total=len(files.images), desc=f"reading labels of {cfg.name}", unit="img",
                           leave=False, disable=len(files.images) < 1000))
    found = [p for _, rows in parsed for p in rows.problems]
    if problems is not None:
        problems.extend(found)
        problems.extend(LabelProblem(files.labels[i], 0, f"{rows.outside} row(s) have coordinates outside the image "
                                     f"(beyond 0..1 by more than {COORD_TOLERANCE}); they are clipped in or dropped "
                                     "while training; fix the labels")
                        for i, (_, rows) in enumerate(parsed) if rows.outside)
    elif found:
        more = f" ({len(found) - 1} more problem(s))" if len(found) > 1 else ""
        raise DataError(f"{found[0]}{more}; `kapao check --data {cfg.source}` lists them all")
    return _labels_from_rows(cfg, files, parsed)


def _labels_from_rows(cfg: DatasetConfig, files: SplitFiles, parsed: list) -> Labels:
    """Pixel labels of the readable images, through the same per-annotation rules as COCO input."""
    stats, k = DatasetStats(), cfg.schema.num_keypoints
    kept, shapes, persons, skipped = [], [], [], []
    for i, ((status, _, hw), rows) in enumerate(parsed):
        if status != "ok":
            stats.missing += status == "missing"
            stats.corrupt += status == "corrupt"
            skipped.append(_relative(files.images[i], cfg.root))
            continue
        parsed = [parse_annotation(a, hw, (1.0, 1.0), k, files.labels[i], stats) for a in row_annotations(rows, hw)]
        pairs = [p for p in parsed if p is not None]
        stats.box_only += sum(not (kp[:, 2] > 0).any() for _, kp in pairs)
        kept.append(i)
        shapes.append(hw)
        persons.append(pairs)
    counts = [len(p) for p in persons]
    flat = [x for p in persons for x in p]
    stats.images, stats.persons, stats.negatives = len(kept), len(flat), counts.count(0)
    return Labels(files=np.array([_relative(files.images[i], cfg.root) for i in kept], dtype=str),
                  image_ids=np.array(kept, np.int64), shapes=np.array(shapes, np.int64).reshape(-1, 2),
                  apply_exif=np.ones(len(kept), bool),
                  offsets=np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64),
                  boxes=np.array([b for b, _ in flat], np.float32).reshape(-1, 4),
                  keypoints=np.array([kp for _, kp in flat], np.float32).reshape(-1, k, 3),
                  stats=stats, skipped=np.array(skipped, dtype=str))


def cache_key(files: SplitFiles, setup: str) -> str:
    """The label-cache key of a split: the cache format, the parse set-up and every image, label and
    list file's path, size and mtime (a missing label file counts as such)."""
    h = hashlib.sha1(f"{CACHE_VERSION}|{setup}".encode())
    for p in (*files.lists, *files.images, *files.labels):
        try:
            st = p.stat()
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode(errors="surrogateescape"))
        except OSError:
            h.update(f"{p}|-\n".encode(errors="surrogateescape"))
    return h.hexdigest()


def load_yolo_labels(cfg: DatasetConfig, split: str) -> Labels:
    """Labels of a split from the cache when every file is unchanged, else parsed and cached."""
    assert cfg.yolo is not None
    files = split_files(cfg, split)
    y = cfg.yolo
    setup = f"yolo|K={cfg.schema.num_keypoints}|ndim={y.ndim}|nc={len(y.classes)}|single={y.single_cls}"
    key = cache_key(files, setup)
    paths = cache_paths(cfg.annotations[split], cfg.root, setup)
    labels = load_cached(paths, key)
    if labels is not None:
        return labels
    labels = parse_split(cfg, files)
    save_cached(labels, paths, key, "the labels")
    return labels


# ----------------------------------------------------------------------------------------------
# Evaluation
def ground_truth(labels: Labels, schema: KeypointSchema) -> Any:  # pycocotools.coco.COCO (imported lazily)
    """An in-memory COCO ground truth of parsed labels: one image per labelled image (ids as in
    `labels.image_ids`), one person per row with bbox [x, y, w, h] and keypoints in original-image
    pixels, area = 0.53 x box area (see :data:`OKS_AREA_NOTE`)."""
    import contextlib
    import io

    from pycocotools.coco import COCO

    images = [{"id": int(i), "file_name": str(f), "height": int(h), "width": int(w)}
              for i, f, (h, w) in zip(labels.image_ids, labels.files, labels.shapes)]
    anns: list[dict[str, Any]] = []
    for n, image_id in enumerate(labels.image_ids):
        for j in range(labels.offsets[n], labels.offsets[n + 1]):
            x1, y1, x2, y2 = (float(v) for v in labels.boxes[j])
            kp = labels.keypoints[j].astype(np.float64)
            anns.append({"id": len(anns) + 1, "image_id": int(image_id), "category_id": 1, "iscrowd": 0,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1) * BOX_AREA_FACTOR,
                         "keypoints": kp.reshape(-1).tolist(), "num_keypoints": int((kp[:, 2] > 0).sum())})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns, "categories": [
        {"id": 1, "name": "person", "keypoints": list(schema.names),
         "skeleton": [[a + 1, b + 1] for a, b in schema.skeleton]}]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco
