"""Ultralytics YOLO-pose datasets as they are: the data YAML and one labels/…/*.txt file per image.

The layout is the one `yolo pose train` reads (and Roboflow, CVAT and Label Studio export):

* a YAML with `path`, `train`/`val`/`test` (image folders, `.txt` image lists, or lists of both),
  `kpt_shape: [K, 2|3]`, `flip_idx`, `names` and optionally `kpt_names` (a list, or per class);
  kapao also reads `skeleton`, `sigmas`, `kp_bbox` and `single_cls` from it when present;
* per image a txt file found by Ultralytics' rule (the last `/images/` of the image path becomes
  `/labels/`, the suffix `.txt`), one row per object: `class cx cy w h x1 y1 [v1] … xK yK [vK]`,
  all normalised to the image's width/height (EXIF orientation applied, as Ultralytics reads it).

Rows become the same per-image label arrays as COCO input (:class:`kapao.data.Labels`), through the
same per-annotation rules (:func:`kapao.data._parse_annotation`): boxes clipped to the image,
persons without labelled keypoints kept as box-only pose objects, images without rows kept as
negatives, keypoints slightly outside clipped in. Without a visibility column a keypoint is labelled
(v = 2) when it lies inside the image and is not exactly (0, 0), the placeholder exporters write for
a missing keypoint. Parsed labels are cached like COCO labels.

For evaluation the ground truth is built in memory (:func:`ground_truth`); YOLO labels carry no
segmentation area, so a person's OKS area is 0.53 x its box area, the convention of Ultralytics and
the CrowdPose tools.
"""
from __future__ import annotations

import hashlib
import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from kapao.config import (DEFAULT_SIGMA, IMAGE_SUFFIXES, SPLITS, DatasetConfig, KeypointSchema, YoloLayout)
from kapao.data import (CACHE_VERSION, DatasetStats, Labels, _cache_paths, _parse_annotation, _probe_image)
from kapao.errors import ConfigError, DataError
from kapao.evaluate import CROWDPOSE_AREA_FACTOR

LOGGER = logging.getLogger(__name__)

OKS_AREA_FACTOR = CROWDPOSE_AREA_FACTOR  # OKS area of a YOLO-labelled person = 0.53 x box area
OKS_AREA_NOTE = (f"YOLO labels have no segmentation area: OKS area = {OKS_AREA_FACTOR} x box area "
                 "(the Ultralytics / CrowdPose convention)")
COORD_TOLERANCE = 0.01  # Ultralytics accepts normalised coordinates up to 1.01
YOLO_KEYS = {"path", *SPLITS, "minival", "names", "nc", "kpt_shape", "flip_idx", "kpt_names", "download",
             "channels", "roboflow", "yaml_file", "name", "sigmas", "skeleton", "kp_bbox", "single_cls"}


# ----------------------------------------------------------------------------------------------
# The YAML
def is_yolo_pose(data: Mapping[str, Any]) -> bool:
    """True for an Ultralytics pose data YAML (it has `kpt_shape`)."""
    return "kpt_shape" in data


def class_names(data: Mapping[str, Any], where: str) -> tuple[str, ...]:
    """Class names in id order from `names` (a list or {id: name}) or `nc`; ConfigError if neither."""
    names = data.get("names")
    if isinstance(names, Mapping):
        try:
            ids = sorted(int(i) for i in names)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: 'names' keys must be class ids 0, 1, …") from None
        if ids != list(range(len(ids))):
            raise ConfigError(f"{where}: 'names' must number the classes 0..{len(ids) - 1}, got ids {ids}")
        return tuple(str(names[i] if i in names else names[str(i)]) for i in ids)
    if isinstance(names, (list, tuple)) and names:
        return tuple(str(n) for n in names)
    if isinstance(data.get("nc"), int) and data["nc"] > 0:
        return tuple(f"class_{i}" for i in range(data["nc"]))
    raise ConfigError(f"{where}: needs 'names' (the class names, e.g. names: {{0: person}}) or 'nc'")


def kpt_shape(data: Mapping[str, Any], where: str) -> tuple[int, int]:
    """(K, ndim) from `kpt_shape: [K, 2|3]`."""
    shape = data.get("kpt_shape")
    try:
        k, ndim = (int(v) for v in shape)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: 'kpt_shape' must be [K, 2] or [K, 3] (keypoints, values per keypoint), "
                          f"got {shape!r}") from None
    if k < 1 or ndim not in (2, 3):
        raise ConfigError(f"{where}: 'kpt_shape' must be [K, 2] or [K, 3] with K >= 1, got {list(shape)}")
    return k, ndim


def keypoint_names(data: Mapping[str, Any], k: int, where: str) -> tuple[str, ...]:
    """`kpt_names` (a list, or {class id: list} of which class 0's is used), else kp0..kp{K-1}."""
    names = data.get("kpt_names")
    if names is None:
        return tuple(f"kp{i}" for i in range(k))
    if isinstance(names, Mapping):
        lists = [list(v) for _, v in sorted(names.items(), key=lambda kv: int(kv[0]))]
        if any(v != lists[0] for v in lists[1:]):
            warnings.warn(f"{where}: 'kpt_names' differs between classes; using class 0's names", stacklevel=3)
        names = lists[0] if lists else []
    names = tuple(str(n) for n in names)
    if len(names) != k:
        raise ConfigError(f"{where}: 'kpt_names' lists {len(names)} names but kpt_shape says K={k}")
    return names


def yolo_schema(data: Mapping[str, Any], where: str) -> KeypointSchema:
    """The keypoint schema of a YOLO-pose YAML (K from kpt_shape; names, flip, sigmas, skeleton if given)."""
    k, _ = kpt_shape(data, where)
    flip = data.get("flip_idx")
    if flip is None:
        warnings.warn(f"{where}: no 'flip_idx'; left-right flips will not swap any keypoints (add flip_idx, or "
                      "--hyp-set fliplr=0 if the keypoints have left/right pairs)", stacklevel=3)
        flip = list(range(k))
    if len(flip) != k:
        raise ConfigError(f"{where}: 'flip_idx' has {len(flip)} entries but kpt_shape says K={k}")
    sigmas = data.get("sigmas")
    if sigmas is None:
        warnings.warn(f"{where}: no 'sigmas' given; using {DEFAULT_SIGMA} for every keypoint in OKS", stacklevel=3)
        sigmas = [DEFAULT_SIGMA] * k
    try:
        return KeypointSchema(names=keypoint_names(data, k, where), flip_index=tuple(int(i) for i in flip),
                              sigmas=tuple(float(s) for s in sigmas),
                              skeleton=tuple((int(a), int(b)) for a, b in data.get("skeleton") or []),
                              kp_bbox=float(data.get("kp_bbox", 0.05)))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def _resolve_entry(root: Path, entry: str) -> Path:
    """An image folder/list of the YAML under the root; Roboflow's `../train/images` also found as
    `train/images` when the former does not exist (Ultralytics' rule)."""
    p = Path(entry).expanduser()
    x = p if p.is_absolute() else (root / p).resolve()
    if not x.exists() and entry.startswith("../"):
        alt = (root / entry[3:]).resolve()
        x = alt if alt.exists() else x
    return x


def dataset_root(data: Mapping[str, Any]) -> Path:
    """The dataset root: `path` relative to the YAML's folder (kapao's rule; an existing folder of that
    name under the current directory, Ultralytics' first choice, is used when the former is missing)."""
    yaml_dir = Path(data["yaml_file"]).parent
    if not data.get("path"):
        return yaml_dir.resolve()
    p = Path(str(data["path"])).expanduser()
    if p.is_absolute():
        return p
    here = (yaml_dir / p).resolve()
    return here if here.exists() or not p.is_dir() else p.resolve()


def yolo_dataset_config(data: Mapping[str, Any], source: str, *, single_cls: bool = False) -> DatasetConfig:
    """A DatasetConfig from an Ultralytics pose YAML's keys (`yaml_file` = the YAML's path).

    Several classes are refused unless `single_cls` (argument or YAML key) merges them: kapao's head
    has one pose-object class (see README, "Bring your own dataset").
    """
    where = f"dataset config {source}"
    unknown = set(data) - YOLO_KEYS
    if unknown:
        LOGGER.warning("%s: ignoring key(s) kapao does not use: %s", where, ", ".join(sorted(unknown)))
    _, ndim = kpt_shape(data, where)
    classes = class_names(data, where)
    single = bool(single_cls or data.get("single_cls", False))
    if len(classes) > 1 and not single:
        raise ConfigError(f"{where} has {len(classes)} classes ({', '.join(classes[:6])}{', …' if len(classes) > 6 else ''})"
                          " but kapao trains one pose class; merge them with --single-cls (or `single_cls: true` in "
                          "the YAML), or make one dataset per class")
    root = dataset_root(data)
    sources: dict[str, tuple[Path, ...]] = {}
    for s in SPLITS:
        entry = data.get(s)
        if entry:
            entries = entry if isinstance(entry, (list, tuple)) else [entry]
            sources[s] = tuple(_resolve_entry(root, str(e)) for e in entries)
    schema = yolo_schema(data, where)
    return DatasetConfig(name=str(data.get("name") or Path(data["yaml_file"]).stem), root=root,
                         images={s: root for s in sources}, annotations={s: v[0] for s, v in sources.items()},
                         schema=schema, source=source, yolo=YoloLayout(sources, classes, ndim, single))


# ----------------------------------------------------------------------------------------------
# Image and label files
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
        return _probe_image(files.images[i]), read_label_file(files.labels[i], k, y.ndim, len(y.classes), y.single_cls)

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
        pairs = [_parse_annotation(a, hw, (1.0, 1.0), k, files.labels[i], stats) for a in row_annotations(rows, hw)]
        pairs = [p for p in pairs if p is not None]
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
    paths = _cache_paths(cfg.annotations[split], cfg.root, setup)
    for p in paths:
        labels = Labels.load(p, key)
        if labels is not None:
            return labels
    labels = parse_split(cfg, files)
    for p in paths:
        try:
            labels.save(p, key)
            break
        except OSError:
            continue
    else:
        LOGGER.warning("could not write a label cache (tried %s); the next start parses the labels again",
                       ", ".join(str(p.parent) for p in paths))
    return labels


# ----------------------------------------------------------------------------------------------
# Evaluation
def ground_truth(labels: Labels, schema: KeypointSchema):  # -> pycocotools.coco.COCO
    """An in-memory COCO ground truth of parsed labels: one image per labelled image (ids as in
    `labels.image_ids`), one person per row with bbox [x, y, w, h] and keypoints in original-image
    pixels, area = 0.53 x box area (see :data:`OKS_AREA_NOTE`)."""
    import contextlib
    import io

    from pycocotools.coco import COCO

    images = [{"id": int(i), "file_name": str(f), "height": int(h), "width": int(w)}
              for i, f, (h, w) in zip(labels.image_ids, labels.files, labels.shapes)]
    anns = []
    for n, image_id in enumerate(labels.image_ids):
        for j in range(labels.offsets[n], labels.offsets[n + 1]):
            x1, y1, x2, y2 = (float(v) for v in labels.boxes[j])
            kp = labels.keypoints[j].astype(np.float64)
            anns.append({"id": len(anns) + 1, "image_id": int(image_id), "category_id": 1, "iscrowd": 0,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1) * OKS_AREA_FACTOR,
                         "keypoints": kp.reshape(-1).tolist(), "num_keypoints": int((kp[:, 2] > 0).sum())})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns, "categories": [
        {"id": 1, "name": "person", "keypoints": list(schema.names),
         "skeleton": [[a + 1, b + 1] for a, b in schema.skeleton]}]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco
