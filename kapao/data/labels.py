"""Labels of a COCO-format keypoint dataset: the JSON parsed into flat arrays, checked, and cached.

Labels are parsed straight from the JSON (no conversion step) and cached in a numpy .npz next to the
JSON (or in the user cache dir when that folder is read-only); images are probed (header only) once.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from kapao.cfg.schema import IMAGE_SUFFIXES
from kapao.data.augment import Instances
from kapao.data.sources import probe_image
from kapao.errors import DataError, OutsideRootError
from kapao.runtime import atomic_write, inside_root

LOGGER = logging.getLogger(__name__)
CACHE_VERSION = 3
KPT_CLIP_MARGIN = 0.02  # labelled keypoints up to this fraction of max(h, w) outside the image are clipped in


# ----------------------------------------------------------------------------------------------
@dataclass
class DatasetStats:
    """Counts from parsing one split. `persons` are kept pose objects, `box_only` those of them with
    no labelled keypoint; `negatives` are usable images without persons."""

    images: int = 0
    persons: int = 0
    box_only: int = 0
    negatives: int = 0
    missing: int = 0
    corrupt: int = 0
    crowd_skipped: int = 0
    empty_boxes: int = 0
    kpts_clipped: int = 0
    kpts_dropped: int = 0
    size_mismatch: int = 0
    orphan_annotations: int = 0  # annotations whose image_id is not among the JSON's images
    outside: int = 0  # image entries naming no file inside the image folder (kapao.runtime.inside_root)

    def summary(self) -> str:
        """One line for the log."""
        line = (f"{self.images} images, {self.persons} persons ({self.box_only} box-only), {self.negatives} negatives, "
                f"{self.missing} missing + {self.corrupt} corrupt images skipped")
        extras = {"crowd annotations skipped": self.crowd_skipped, "zero-size boxes skipped": self.empty_boxes,
                  "keypoints clipped into the image": self.kpts_clipped, "keypoints far outside dropped": self.kpts_dropped,
                  "images whose size differs from the JSON (labels rescaled)": self.size_mismatch,
                  "annotations of image ids missing from 'images' skipped": self.orphan_annotations,
                  "image entries leading outside the image folder skipped": self.outside}
        return line + "".join(f", {v} {k}" for k, v in extras.items() if v)

    def to_array(self) -> np.ndarray:
        return np.array(dataclasses.astuple(self), np.int64)

    @classmethod
    def from_array(cls, a: np.ndarray) -> "DatasetStats":
        return cls(*(int(v) for v in a))


# ----------------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------------
@dataclass
class Labels:
    """Parsed labels of one split, as flat arrays (cheap to cache and to share with workers).

    Image i has persons offsets[i]:offsets[i+1] of boxes (P, 4: x1, y1, x2, y2) and keypoints
    (P, K, 3: x, y, v), in pixels of the original (decoded) image; shapes (N, 2) are (h, w).
    """

    files: np.ndarray  # (N,) str, relative to the image folder
    image_ids: np.ndarray  # (N,) int64 (or str for datasets with string ids)
    shapes: np.ndarray  # (N, 2) int64
    apply_exif: np.ndarray  # (N,) bool; False where the JSON's size matches the raw, un-rotated pixels
    offsets: np.ndarray  # (N + 1,) int64
    boxes: np.ndarray  # (P, 4) float32
    keypoints: np.ndarray  # (P, K, 3) float32
    stats: DatasetStats
    skipped: np.ndarray  # (S,) str: missing or corrupt image files

    def __len__(self) -> int:
        return len(self.files)

    def instances(self, i: int) -> Instances:
        a, b = self.offsets[i], self.offsets[i + 1]
        return Instances(self.boxes[a:b].copy(), self.keypoints[a:b].copy(), np.ones(b - a, bool))

    def save(self, path: Path, key: str) -> None:
        """Write atomically as .npz (no pickle)."""
        with atomic_write(path) as f:
            np.savez(f, version=np.int64(CACHE_VERSION), key=np.str_(key), files=self.files, image_ids=self.image_ids,
                     shapes=self.shapes, apply_exif=self.apply_exif, offsets=self.offsets, boxes=self.boxes,
                     keypoints=self.keypoints, stats=self.stats.to_array(), skipped=self.skipped)

    @classmethod
    def load(cls, path: Path, key: str) -> "Labels | None":
        """The cached labels, or None when the file is absent, stale or unreadable."""
        try:
            with np.load(path, allow_pickle=False) as z:
                if int(z["version"]) != CACHE_VERSION or str(z["key"]) != key:
                    return None
                return cls(files=z["files"], image_ids=z["image_ids"], shapes=z["shapes"], apply_exif=z["apply_exif"],
                           offsets=z["offsets"], boxes=z["boxes"], keypoints=z["keypoints"],
                           stats=DatasetStats.from_array(z["stats"]), skipped=z["skipped"])
        except Exception:  # noqa: BLE001 - absent, truncated or foreign file: parse again
            return None


# ----------------------------------------------------------------------------------------------
def _id_kind(value: Any) -> str | None:
    """'int' or 'str' for a usable COCO id, None otherwise (bools and floats are not ids)."""
    if isinstance(value, bool):
        return None
    return "int" if isinstance(value, int) else "str" if isinstance(value, str) and value else None


def _check_ids(entries: list, what: str, where: str) -> str | None:
    """The one id kind of `entries` (images or annotations); DataError on a missing, mixed or repeated id."""
    kinds, seen = set(), set()
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise DataError(f"{where}: {what} entry #{i} is not an object; fix the file")
        kind = _id_kind(e.get("id"))
        if kind is None:
            raise DataError(f"{where}: {what} entry #{i} has id {e.get('id')!r}; ids must be integers (or all strings)")
        kinds.add(kind)
        if len(kinds) > 1:
            raise DataError(f"{where}: {what} id {e['id']!r} is a {kind} but earlier ids are not; use one id type")
        if e["id"] in seen:
            raise DataError(f"{where}: {what} id {e['id']!r} appears twice; ids must be unique (the second entry "
                            "would silently replace the first)")
        seen.add(e["id"])
    return kinds.pop() if kinds else None


def _bad_numbers(values: Any, length: int | None) -> str | None:
    """Why `values` is not a list of `length` (any multiple of 3 when 0) finite numbers, or None."""
    if not isinstance(values, list) or any(isinstance(v, (bool, str)) or v is None for v in values):
        return "must be a list of numbers"
    if (length and len(values) != length) or (length == 0 and len(values) % 3):
        return f"has {len(values)} values, expected {length or 'a multiple of 3'}"
    try:
        a = np.asarray(values, np.float64)
    except (TypeError, ValueError):
        return "must be a list of numbers"
    return None if np.all(np.isfinite(a)) else "holds NaN or infinite values"


def _check_annotation(a: dict, where: str, image_kind: str | None, num_keypoints: int | None) -> None:
    """DataError naming the annotation id and field of the first bad value of one annotation."""
    aid = a["id"]
    for key in ("image_id", "category_id", "bbox"):
        if key not in a:
            raise DataError(f"{where}: annotation id {aid!r} has no '{key}'; fix the annotation")
    if _id_kind(a["image_id"]) != image_kind:
        raise DataError(f"{where}: annotation id {aid!r} has image_id {a['image_id']!r}, not an id of the kind the "
                        "images use; use one id type")
    if _id_kind(a["category_id"]) is None:
        raise DataError(f"{where}: annotation id {aid!r}: 'category_id' must be an integer, got {a['category_id']!r}")
    checks = [("bbox", a["bbox"], 4), ("keypoints", a.get("keypoints", []), 3 * num_keypoints if num_keypoints else 0)]
    checks += [(k, [a[k]], 1) for k in ("area", "score") if k in a]
    for key, values, n in checks:
        why = _bad_numbers(values, n)
        if why:
            raise DataError(f"{where}: annotation id {aid!r}: '{key}' {why}; fix the annotation")
    if a["bbox"][2] < 0 or a["bbox"][3] < 0:
        raise DataError(f"{where}: annotation id {aid!r}: 'bbox' width and height must be >= 0, got {a['bbox']}")
    if a.get("iscrowd", 0) not in (0, 1) or isinstance(a.get("iscrowd"), float):
        raise DataError(f"{where}: annotation id {aid!r}: 'iscrowd' must be 0 or 1, got {a['iscrowd']!r}")


def validate_coco(dataset: Any, where: str, num_keypoints: int | None = None) -> None:
    """Check a COCO-format keypoint dataset (the parsed JSON) before anything reads its values.

    Used by both the training labels (:func:`read_coco`) and evaluation (:mod:`kapao.eval.metrics`), so no
    metric or target is ever computed from unchecked values. Checked: 'images' and 'annotations' are
    lists (absent: empty); image and annotation ids are present, unique and of one type (int, or str); each annotation's
    image_id has the images' id type, category_id is an id, bbox is 4 finite numbers with w, h >= 0,
    keypoints are finite numbers (3 * num_keypoints of them when given, else a multiple of 3), area and
    score (when present) are finite, iscrowd is 0 or 1. Raises DataError naming `where`, the id and the field.
    """
    if not isinstance(dataset, dict) or not isinstance(dataset.get("images", []), list) \
            or not isinstance(dataset.get("annotations", []), list):
        raise DataError(f"{where}: not a COCO annotation file (needs 'images' and 'annotations' lists); "
                        "re-download or fix the file")
    image_kind = _check_ids(dataset.get("images", []), "image", where)
    _check_ids(dataset.get("annotations", []), "annotation", where)
    for a in dataset.get("annotations", []):
        _check_annotation(a, where, image_kind, num_keypoints)


def read_coco(ann_file: Path) -> Any:  # pycocotools.coco.COCO (imported lazily)
    """Load a COCO-format JSON, checked by :func:`validate_coco`, as a pycocotools COCO object (prints silenced)."""
    from pycocotools.coco import COCO  # deferred: a start from the label cache never needs it

    if not ann_file.is_file():
        raise DataError(f"annotation file not found: {ann_file}; check the dataset YAML's *_annotations entries")
    if ann_file.stat().st_size == 0:
        raise DataError(f"{ann_file} is empty (0 bytes); re-download or fix the file")
    try:
        with open(ann_file, "rb") as f:
            dataset = json.load(f)
    except OSError as e:
        raise DataError(f"cannot read {ann_file}: {e.strerror or e}; check its permissions") from None
    except ValueError as e:  # JSON syntax or encoding
        raise DataError(f"{ann_file}: not a valid COCO-format JSON ({e}); re-download or fix the file") from None
    validate_coco(dataset, str(ann_file))
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _person_category_ids(coco: Any) -> set | None:
    """Ids of categories that define keypoints; None (= all annotations) when none do."""
    ids = {c["id"] for c in coco.dataset.get("categories", []) if c.get("keypoints")}
    return ids or None


def parse_annotation(a: dict, img_hw: tuple[int, int], sxy: tuple[float, float], k: int, ann_file: Path,
                      stats: DatasetStats) -> tuple[np.ndarray, np.ndarray] | None:
    """One annotation -> (box (4,) xyxy, keypoints (K, 3)) in image pixels, or None if skipped."""
    h, w = img_hw
    raw = a.get("keypoints") or []
    raw = raw if isinstance(raw, (list, tuple)) else []
    if len(raw) != 3 * k:
        raise DataError(f"{ann_file}: annotation id {a.get('id')} has {len(raw) / 3:g} keypoints but the dataset schema "
                        f"has K={k}; fix the annotation or the dataset YAML's kpt_names")
    try:
        x, y, bw, bh = (float(v) for v in a["bbox"])
        kpts = np.array(raw, np.float32).reshape(k, 3) if k else np.zeros((0, 3), np.float32)
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{ann_file}: annotation id {a.get('id')} needs a 'bbox' of 4 numbers [x, y, w, h] and "
                        f"numeric 'keypoints'; fix the annotation") from None
    box = np.array([x * sxy[0], y * sxy[1], (x + bw) * sxy[0], (y + bh) * sxy[1]], np.float32)
    box[[0, 2]] = box[[0, 2]].clip(0, w)
    box[[1, 3]] = box[[1, 3]].clip(0, h)
    if box[2] <= box[0] or box[3] <= box[1]:
        stats.empty_boxes += 1
        return None
    kpts[:, :2] *= sxy
    kpts[kpts[:, 2] <= 0] = 0.0
    vis = kpts[:, 2] > 0
    margin = KPT_CLIP_MARGIN * max(h, w)
    out = vis & ((kpts[:, 0] < 0) | (kpts[:, 0] >= w) | (kpts[:, 1] < 0) | (kpts[:, 1] >= h))
    far = out & ((kpts[:, 0] < -margin) | (kpts[:, 0] >= w + margin) | (kpts[:, 1] < -margin) | (kpts[:, 1] >= h + margin))
    kpts[far] = 0.0
    kpts[:, 0] = np.where(out & ~far, kpts[:, 0].clip(0, w - 1e-3), kpts[:, 0])  # inside [0, w)
    kpts[:, 1] = np.where(out & ~far, kpts[:, 1].clip(0, h - 1e-3), kpts[:, 1])
    stats.kpts_dropped += int(far.sum())
    stats.kpts_clipped += int((out & ~far).sum())
    return box, kpts


def _label_frame(info: dict, raw_hw: tuple[int, int],
                 hw: tuple[int, int]) -> tuple[tuple[int, int], bool, tuple[float, float]]:
    """The pixel frame labels refer to: ((h, w) after decoding, apply EXIF?, JSON-to-pixel scale (sx, sy)).

    If the JSON's size matches the raw pixels but not the EXIF-rotated ones, the labels were made on
    the raw pixels: keep them un-rotated. Any other size difference rescales the labels.
    """
    json_hw = (int(info.get("height") or hw[0]), int(info.get("width") or hw[1]))  # checked by _check_images
    apply_exif = not (json_hw == raw_hw and json_hw != hw)
    hw = hw if apply_exif else raw_hw
    return hw, apply_exif, (hw[1] / json_hw[1], hw[0] / json_hw[0])


def _image_persons(anns: list[dict], hw: tuple[int, int], sxy: tuple[float, float], k: int, cats: set | None,
                   skip_crowd: bool, ann_file: Path, stats: DatasetStats) -> list[tuple[np.ndarray, np.ndarray]]:
    """The kept (box, keypoints) pairs of one image's annotations; updates the skip counters."""
    persons = []
    for a in anns:
        if cats is not None and a.get("category_id") not in cats:
            continue
        if skip_crowd and a.get("iscrowd", 0):
            stats.crowd_skipped += 1
            continue
        parsed = parse_annotation(a, hw, sxy, k, ann_file, stats)
        if parsed is not None:
            persons.append(parsed)
            stats.box_only += not (parsed[1][:, 2] > 0).any()
    return persons


def _check_images(infos: list[dict], ann_file: Path) -> None:
    """DataError naming the first image entry without a usable file_name, width or height."""
    for info in infos:
        ok = isinstance(info.get("file_name"), str) and info["file_name"]
        try:
            ok = ok and all(int(info.get(key) or 1) > 0 for key in ("height", "width"))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise DataError(f"{ann_file}: image id {info.get('id')!r} needs a 'file_name' and positive integer "
                            "'width'/'height'; fix the image entry")


def _inside_images(infos: list[dict], img_dir: Path, ann_file: Path, stats: DatasetStats) -> list[dict]:
    """The image entries whose file_name stays inside `img_dir`; the others are counted in
    `stats.outside` (never opened) and the first is logged."""
    kept = []
    for info in infos:
        try:
            inside_root(img_dir, info["file_name"], f"{ann_file}: image id {info.get('id')!r}:")
        except OutsideRootError as e:
            if not stats.outside:
                LOGGER.warning("%s; skipped", e)
            stats.outside += 1
            continue
        kept.append(info)
    return kept


def parse_annotations(ann_file: Path, img_dir: Path, num_keypoints: int, skip_crowd: bool,
                      coco: Any = None, workers: int = 8) -> Labels:
    """Parse a COCO keypoint JSON and probe its images (threads). Raises DataError on bad annotations."""
    coco = coco if coco is not None else read_coco(ann_file)
    stats, k, cats = DatasetStats(), num_keypoints, _person_category_ids(coco)
    infos = list(coco.imgs.values())
    _check_images(infos, ann_file)
    stats.orphan_annotations = sum(len(v) for i, v in coco.imgToAnns.items() if i not in coco.imgs)
    infos = _inside_images(infos, img_dir, ann_file, stats)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        jobs = pool.map(lambda info: probe_image(img_dir / info["file_name"]), infos)
        probes = list(tqdm(jobs, total=len(infos), desc=f"checking images in {img_dir.name}", unit="img",
                           leave=False, disable=len(infos) < 1000))  # only the first start of a big set is slow
    kept, frames, persons, skipped = [], [], [], []
    for info, (status, raw_hw, hw) in zip(infos, probes):
        if status != "ok":
            stats.missing += status == "missing"
            stats.corrupt += status == "corrupt"
            skipped.append(info["file_name"])
            continue
        hw, apply_exif, sxy = _label_frame(info, raw_hw, hw)
        stats.size_mismatch += sxy != (1.0, 1.0)
        kept.append(info)
        frames.append((hw, apply_exif))
        persons.append(_image_persons(coco.imgToAnns.get(info["id"], []), hw, sxy, k, cats, skip_crowd, ann_file, stats))
    counts = [len(p) for p in persons]
    flat = [x for p in persons for x in p]
    stats.images, stats.persons, stats.negatives = len(kept), len(flat), counts.count(0)
    return Labels(files=np.array([i["file_name"] for i in kept], dtype=str), image_ids=np.array([i["id"] for i in kept]),
                  shapes=np.array([f[0] for f in frames], np.int64).reshape(-1, 2),
                  apply_exif=np.array([f[1] for f in frames], bool),
                  offsets=np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64),
                  boxes=np.array([b for b, _ in flat], np.float32).reshape(-1, 4),
                  keypoints=np.array([kp for _, kp in flat], np.float32).reshape(-1, k, 3),
                  stats=stats, skipped=np.array(skipped, dtype=str))


# ----------------------------------------------------------------------------------------------
def _file_digest(path: Path) -> str:
    """SHA-1 of a file's bytes, read in 1 MiB chunks (about a second for COCO's largest JSON)."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _listing_digest(img_dir: Path) -> str:
    """Digest of the relative names of all image files under the image folder."""
    h = hashlib.sha1()
    for root, dirs, names in os.walk(img_dir):
        dirs.sort()
        rel = os.path.relpath(root, img_dir)
        for n in sorted(names):
            if n.lower().endswith(IMAGE_SUFFIXES):
                h.update(f"{rel}/{n}\n".encode(errors="surrogateescape"))
    return h.hexdigest()


def _writable_dir(d: Path) -> bool:
    """True for an existing folder we may write; honours missing write bits even when running as root."""
    try:
        return os.access(d, os.W_OK) and bool(d.stat().st_mode & 0o222)
    except OSError:
        return False


def cache_paths(ann_file: Path, img_dir: Path, setup: str) -> list[Path]:
    """Cache files to try, best first: $KAPAO_CACHE_DIR if set, next to the JSON if that folder is
    writable, else the user cache dir ($XDG_CACHE_HOME/kapao or ~/.cache/kapao)."""
    tag = hashlib.sha1(f"{img_dir.resolve()}|{setup}".encode()).hexdigest()[:8]
    name = f"{ann_file.name}.{tag}.cache"
    where = hashlib.sha1(str(ann_file.resolve()).encode()).hexdigest()[:8]
    if os.environ.get("KAPAO_CACHE_DIR"):
        return [Path(os.environ["KAPAO_CACHE_DIR"]) / f"{where}-{name}"]
    user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kapao" / f"{where}-{name}"
    return [ann_file.with_name(name), user] if _writable_dir(ann_file.parent) else [user]


def load_labels(ann_file: Path, img_dir: Path, num_keypoints: int, skip_crowd: bool) -> tuple[Labels, Any]:
    """Labels of a split from the cache when it matches the JSON and image folder, else parsed and cached.

    Returns (labels, coco): coco is the pycocotools object when the JSON was parsed, None on a cache
    hit. The cache key covers the JSON's content (a digest: an edit that keeps size and mtime still
    invalidates it), the image file names, K, the crowd rule and
    the cache format version.
    """
    try:
        st = ann_file.stat()
    except FileNotFoundError:
        raise DataError(f"annotation file not found: {ann_file}; check the dataset YAML's *_annotations entries") from None
    if not img_dir.is_dir():
        raise DataError(f"image folder not found: {img_dir}; check the dataset YAML's path and split entries")
    setup = f"K={num_keypoints}|crowd={'skip' if skip_crowd else 'keep'}"
    key = f"{CACHE_VERSION}|{st.st_size}|{_file_digest(ann_file)}|{setup}|{_listing_digest(img_dir)}"
    paths = cache_paths(ann_file, img_dir, setup)
    labels = load_cached(paths, key)
    if labels is not None:
        return labels, None
    coco = read_coco(ann_file)
    labels = parse_annotations(ann_file, img_dir, num_keypoints, skip_crowd, coco=coco)
    save_cached(labels, paths, key, ann_file.name)
    return labels, coco


def load_cached(paths: Sequence[Path], key: str) -> Labels | None:
    """The first cache file among `paths` whose key matches, else None."""
    for p in paths:
        labels = Labels.load(p, key)
        if labels is not None:
            return labels
    return None


def save_cached(labels: Labels, paths: Sequence[Path], key: str, what: str) -> None:
    """Write the label cache to the first writable of `paths`; a warning (naming `what`) if none is."""
    for p in paths:
        try:
            labels.save(p, key)
            return
        except OSError:
            continue
    LOGGER.warning("could not write a label cache (tried %s); the next start parses %s again",
                   ", ".join(str(p.parent) for p in paths), what)
