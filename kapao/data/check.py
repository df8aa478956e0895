"""`kapao check`: a dataset doctor for COCO-JSON and YOLO-pose datasets.

It loads every split as training would (the same parsers, without the label cache), counts what it
found and lists each problem with the file and what to do:

errors (exit status 1): missing or corrupt images, label rows of the wrong length for K, class ids out
of range, non-numeric values, labels outside the image, a flip_idx that is not a pair-swapping
permutation, several classes without single_cls, annotations that cannot be parsed;
warnings: tiny boxes, identical images (also across splits), keypoint pairs whose left/right labels
look swapped, and label files that are absent for a whole split.

Left/right check, in upright persons (box height >= width) with both keypoints of a pair labelled:
each pair's horizontal order (left keypoint right or left of the right one) is compared with the
order most of that person's other pairs show. A pair that disagrees with the rest in most persons
has its labels (or its kpt_names/flip_idx entries) swapped. Over the whole split, people facing the
camera show their left side on the image's right, so when named left_* keypoints lie left of their
right_* partners in most persons, the labels were probably made from the viewer's side.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
from tqdm import tqdm

from kapao.cfg.dataset import load_dataset_config, resolve_dataset_yaml

# resolve_dataset_yaml: the raw keys, to check flip_idx and classes before the schema does
from kapao.cfg.schema import SPLITS, DatasetConfig, KeypointSchema
from kapao.cfg.yolo import class_names, kpt_shape
from kapao.data.labels import Labels, parse_annotations
from kapao.data.sources import load_image
from kapao.data.yolo_labels import parse_split, split_files
from kapao.errors import DataError
from kapao.runtime import increment_run_dir

LOGGER = logging.getLogger(__name__)

TINY_BOX_FRACTION = 0.01  # a box side below 1% of the image's long side (6 px at 640) is too small to learn
LR_MARGIN = 0.02  # a pair's horizontal order counts when the keypoints are this fraction of the box width apart
LR_MIN_PERSONS = 3  # a pair is judged on at least this many upright persons
LR_VIEWER_FRACTION = 2 / 3  # left-on-the-image-left in more than this share of persons: viewer-side labels
LR_VIEWER_MIN_PERSONS = 5
MAX_LISTED = 10  # files listed per problem kind


@dataclass
class Finding:
    """One finding: 'error' or 'warning', where (a file or the dataset) and what is wrong / what to do."""

    severity: str
    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.severity.upper():7s} {self.where}: {self.what}"


@dataclass
class SplitCounts:
    """What a split holds once parsed as training would parse it."""

    images: int
    persons: int
    box_only: int
    negatives: int
    missing: int
    corrupt: int
    keypoints: np.ndarray  # (K, 3): per keypoint type, persons with v = 0 (unlabelled), v = 1, v = 2
    no_label_file: int = 0  # YOLO: images without a label txt (negatives)


@dataclass
class CheckReport:
    """Result of :func:`check_dataset`."""

    cfg: DatasetConfig | None
    counts: dict[str, SplitCounts] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    save_dir: Path | None = None
    samples: list[Path] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [p for p in self.findings if p.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [p for p in self.findings if p.severity == "warning"]


# ----------------------------------------------------------------------------------------------
def check_dataset(data: str | os.PathLike, *, single_cls: bool = False, splits: Sequence[str] | None = None,
                  samples: int = 4, project: str | os.PathLike | None = "runs/check", name: str = "exp") -> CheckReport:
    """Load every split of dataset config `data` and report counts and findings.

    Up to `samples` images with persons are drawn with their labels into a new `project/nameN`
    folder (none with project=None). Raises ConfigError only for a YAML it cannot read at all.
    """
    report = CheckReport(None)
    cfg = _load_config(data, single_cls, report.findings)
    report.cfg = cfg
    loaded: dict[str, tuple[Labels, Path]] = {}
    for split in splits or [s for s in SPLITS if s in cfg.annotations]:
        got = _check_split(cfg, split, report)
        if got is not None:
            loaded[split] = got
    report.findings += _duplicates(loaded)
    if project is not None:
        report.save_dir = increment_run_dir(project, name)
        report.samples = render_samples(cfg, loaded, report.save_dir, samples)
    return report


def _load_config(data: str | os.PathLike, single_cls: bool, findings: list[Finding]) -> DatasetConfig:
    """The dataset config; a bad flip_idx or several classes become findings and are worked around."""
    raw, source = resolve_dataset_yaml(data)
    overrides: dict[str, Any] = {}
    if "kpt_shape" in raw:
        classes = class_names(raw, source)
        if len(classes) > 1 and not (single_cls or raw.get("single_cls")):
            findings.append(Finding("error", source, f"{len(classes)} classes ({', '.join(classes[:6])}) but kapao "
                                    "trains one pose class: use --single-cls (or `single_cls: true`) to merge them, or "
                                    "make one dataset per class; checked here as one class"))
            single_cls = True
        k = kpt_shape(raw, source)[0]
    else:
        k = len(raw.get("kpt_names") or [])
    flip = raw.get("flip_idx")
    if flip is not None and k:
        why = _flip_problem(list(flip), k)
        if why:
            findings.append(Finding("error", source, f"flip_idx {list(flip)} {why}; flip_idx[k] must name the "
                                    "keypoint k becomes in a mirrored image (pairs swapped, others themselves); "
                                    "checked here without flipping"))
            overrides["flip_idx"] = list(range(k))
    return load_dataset_config(data, single_cls=single_cls, overrides=overrides)


def _flip_problem(flip: list, k: int) -> str:
    """Why `flip` is not a valid flip permutation of K keypoints ('' when it is)."""
    try:
        f = [int(i) for i in flip]
    except (TypeError, ValueError):
        return "holds values that are not integers"
    if len(f) != k:
        return f"has {len(f)} entries for {k} keypoints"
    if sorted(f) != list(range(k)):
        return f"is not a permutation of 0..{k - 1}"
    bad = [i for i in range(k) if f[f[i]] != i]
    return f"is not an involution (applying it twice moves keypoints {bad[:6]})" if bad else ""


def _check_split(cfg: DatasetConfig, split: str, report: CheckReport) -> tuple[Labels, Path] | None:
    """Parse one split, add its counts and findings; (labels, image root) or None if it cannot be parsed."""
    findings = report.findings
    try:
        if cfg.yolo is not None:
            labels, no_label = _parse_yolo(cfg, split, findings)
        else:
            img_dir, ann_file = cfg.require(split)
            labels, no_label = parse_annotations(ann_file, img_dir, cfg.schema.num_keypoints, split == "train"), 0
    except DataError as e:
        findings.append(Finding("error", f"{cfg.name} {split}", f"{e}"))
        return None
    root = cfg.images[split]
    s = labels.stats
    v = np.digitize(labels.keypoints[..., 2], [1e-9, 1.5])  # 0, 1 (0 < v < 1.5, e.g. a float score) or 2
    per_type = np.stack([(v == i).sum(0) for i in range(3)], 1) if len(v) else np.zeros((cfg.schema.num_keypoints, 3), np.int64)
    report.counts[split] = SplitCounts(s.images, s.persons, s.box_only, s.negatives, s.missing, s.corrupt, per_type, no_label)
    findings += _image_problems(labels, root, split)
    findings += _stat_problems(labels, cfg, split)
    findings += _tiny_boxes(labels, root, f"{cfg.name} {split}")
    findings += left_right_problems(labels, cfg.schema, f"{cfg.name} {split}")
    return labels, root


def _parse_yolo(cfg: DatasetConfig, split: str, findings: list[Finding]) -> tuple[Labels, int]:
    files = split_files(cfg, split)
    found: list = []
    labels = parse_split(cfg, files, problems=found)
    findings += [Finding("error", str(p.file) + (f":{p.line}" if p.line else ""), p.what) for p in found]
    no_label = sum(not p.is_file() for p in files.labels)
    if files.images and no_label == len(files.images):
        findings.append(Finding("warning", f"{cfg.name} {split}", f"none of the {no_label} images has a label file "
                                f"(e.g. {files.labels[0]}); labels must sit where the last /images/ of the image path "
                                "becomes /labels/, with the suffix .txt"))
    return labels, no_label


def _listed(items: Sequence[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")


def _image_problems(labels: Labels, root: Path, split: str) -> list[Finding]:
    out = []
    for f in labels.skipped:
        path = root / str(f)
        state = "corrupt (cannot be decoded)" if path.exists() else "missing"
        out.append(Finding("error", str(path), f"image {state} in split {split}; replace it or remove it and its labels"))
    return out


def _stat_problems(labels: Labels, cfg: DatasetConfig, split: str) -> list[Finding]:
    """Label defects the parser counted (it fixes them while training: clips, drops or skips)."""
    s = labels.stats
    where = f"{cfg.name} {split}" if cfg.yolo is not None else str(cfg.annotations[split])
    found = {"person box(es) lie outside the image (zero size after clipping) and are skipped": s.empty_boxes,
             "labelled keypoint(s) lie far outside the image and are dropped": s.kpts_dropped,
             "annotation(s) refer to image ids missing from 'images' and are skipped": s.orphan_annotations}
    out = [Finding("error", where, f"{n} {what}; fix the labels") for what, n in found.items() if n]
    if s.persons == 0 and s.images:
        out.append(Finding("warning", where, f"no person labels in split {split}: all {s.images} images are negatives"))
    return out


def _tiny_boxes(labels: Labels, root: Path, where: str) -> list[Finding]:
    side = np.minimum(labels.boxes[:, 2] - labels.boxes[:, 0], labels.boxes[:, 3] - labels.boxes[:, 1])
    image_of = np.repeat(np.arange(len(labels)), np.diff(labels.offsets))
    long_side = labels.shapes.max(1)[image_of] if len(labels) else np.zeros(0)
    tiny = side < TINY_BOX_FRACTION * long_side
    if not tiny.any():
        return []
    files = sorted({str(root / str(labels.files[i])) for i in image_of[tiny]})
    return [Finding("warning", where, f"{int(tiny.sum())} person box(es) have a side below "
                    f"{TINY_BOX_FRACTION:.0%} of the image's long side, too small to learn at usual input sizes "
                    f"(in {_listed(files)}); check them or remove them")]


def _duplicates(loaded: dict[str, tuple[Labels, Path]]) -> list[Finding]:
    """Different image files with identical bytes, within and across splits (one file that several
    splits list on purpose, e.g. val = train for a quick test, is not reported)."""
    by_hash: dict[str, list[tuple[str, Path]]] = defaultdict(list)
    seen: set[Path] = set()
    total = sum(len(labels) for labels, _ in loaded.values())
    bar = tqdm(total=total, desc="looking for identical images", unit="img", leave=False, disable=total < 1000)
    for split, (labels, root) in loaded.items():
        for f in labels.files:
            bar.update()
            path = root / str(f)
            real = path.resolve()
            if real not in seen:
                seen.add(real)
                by_hash[hashlib.sha1(real.read_bytes()).hexdigest()].append((split, path))
    bar.close()
    out = []
    for group in by_hash.values():
        if len(group) > 1:
            splits = sorted({s for s, _ in group})
            leak = (f" across splits ({', '.join(splits)}): validation on them measures memory, not generalisation"
                    if len(splits) > 1 else "")
            out.append(Finding("warning", str(group[0][1]), f"{len(group) - 1} identical cop(ies){leak}: "
                               f"{_listed([str(p) for _, p in group[1:]])}; keep one"))
    return out


# ----------------------------------------------------------------------------------------------
def left_right_pairs(schema: KeypointSchema) -> tuple[list[tuple[int, int]], bool]:
    """(left, right) keypoint pairs of the flip permutation, and whether the names say which is left.

    Without left/right in the names, the lower index of each pair is taken as one side for all pairs.
    """
    pairs, named = [], False
    for a in range(schema.num_keypoints):
        b = schema.flip_index[a]
        if a < b:
            na, nb = schema.names[a].lower(), schema.names[b].lower()
            if "right" in na and "left" in nb:
                pairs.append((b, a))
                named = True
            else:
                pairs.append((a, b))
                named = named or ("left" in na and "right" in nb)
    return pairs, named


def _person_orders(labels: Labels, pairs: list[tuple[int, int]]) -> list[dict[int, int]]:
    """Per upright person: pair index -> +1 (left keypoint right of the right one) or -1."""
    out = []
    for box, kp in zip(labels.boxes, labels.keypoints):
        w, h = box[2] - box[0], box[3] - box[1]
        if h < w:
            continue
        orders = {}
        for i, (a, b) in enumerate(pairs):
            dx = kp[a, 0] - kp[b, 0]
            if kp[a, 2] > 0 and kp[b, 2] > 0 and abs(dx) > max(LR_MARGIN * w, 1.0):
                orders[i] = 1 if dx > 0 else -1
        out.append(orders)
    return out


def left_right_problems(labels: Labels, schema: KeypointSchema, where: str) -> list[Finding]:
    """Warnings for keypoint pairs whose left/right labels look swapped (see the module docstring)."""
    pairs, named = left_right_pairs(schema)
    if not pairs:
        return []
    total, disagree, majorities = np.zeros(len(pairs), int), np.zeros(len(pairs), int), []
    for orders in _person_orders(labels, pairs):
        vote = sum(orders.values())
        if len(orders) < 2 or vote == 0:
            continue
        majority = 1 if vote > 0 else -1
        majorities.append(majority)
        for i, o in orders.items():
            total[i] += 1
            disagree[i] += o != majority
    out = []
    for i, (a, b) in enumerate(pairs):
        if total[i] >= LR_MIN_PERSONS and disagree[i] * 2 > total[i]:
            out.append(Finding("warning", where, f"keypoints {schema.names[a]} / {schema.names[b]} look swapped: their "
                               f"left-right order disagrees with the person's other pairs in {disagree[i]} of {total[i]} "
                               "upright persons; check these labels and their kpt_names / flip_idx entries"))
    n = len(majorities)
    viewer = sum(m < 0 for m in majorities)
    if named and n >= LR_VIEWER_MIN_PERSONS and viewer > LR_VIEWER_FRACTION * n:
        out.append(Finding("warning", where, f"left keypoints lie on the image's left of their right partners in {viewer} "
                           f"of {n} upright persons; people facing the camera show their left side on the image's "
                           "right, so the labels look made from the viewer's side (left and right swapped). Ignore "
                           "this if most persons face away from the camera"))
    return out


# ----------------------------------------------------------------------------------------------
def render_samples(cfg: DatasetConfig, loaded: dict[str, tuple[Labels, Path]], save_dir: Path, n: int) -> list[Path]:
    """Draw up to `n` images with persons (boxes, labelled keypoints, skeleton) per split into save_dir."""
    from kapao.draw import draw_poses

    written = []
    for split, (labels, root) in loaded.items():
        with_persons = [i for i in range(len(labels)) if labels.offsets[i + 1] > labels.offsets[i]]
        for i in with_persons[:n]:
            a, b = labels.offsets[i], labels.offsets[i + 1]
            path = root / str(labels.files[i])
            try:
                img = load_image(path, bool(labels.apply_exif[i]))
            except DataError:
                continue
            drawn = draw_poses(img, labels.boxes[a:b], labels.keypoints[a:b], cfg.schema, show_scores=False)
            out = save_dir / f"{split}_{Path(str(labels.files[i])).stem}.jpg"
            if cv2.imwrite(str(out), drawn):
                written.append(out)
    return written


def format_report(report: CheckReport) -> str:
    """Counts per split, keypoints per type and visibility, then every problem."""
    cfg, lines = report.cfg, []
    assert cfg is not None  # check_dataset always sets it
    lines.append(f"dataset {cfg.name} ({cfg.format} format, {cfg.source}); K={cfg.schema.num_keypoints}")
    for split, c in report.counts.items():
        extra = f", {c.no_label_file} without a label file" if cfg.format == "yolo" else ""
        lines.append(f"{split}: {c.images} images, {c.persons} persons ({c.box_only} box-only), {c.negatives} negatives"
                     f"{extra}, {c.missing} missing + {c.corrupt} corrupt images")
        lines.append(f"  {'keypoint':<18} {'labelled':>8} {'v=1':>6} {'v=2':>6} {'v=0':>6}")
        for name, (v0, v1, v2) in zip(cfg.schema.names, c.keypoints):
            lines.append(f"  {name:<18} {v1 + v2:>8d} {v1:>6d} {v2:>6d} {v0:>6d}")
    lines += [str(p) for p in report.findings]
    lines.append(f"{len(report.errors)} error(s), {len(report.warnings)} warning(s)")
    return "\n".join(lines)
