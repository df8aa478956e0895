"""Training/validation data: COCO-format keypoint JSON + images -> augmented images and KAPAO targets.

Labels are parsed straight from the JSON (no conversion step) and cached in a numpy .npz next to the
JSON (or in the user cache dir when that folder is read-only). Targets follow
:class:`kapao.config.TargetLayout`: one pose object (class 0: box + K keypoints) per person and one
keypoint object (class k+1, a square box) per visible keypoint, built after augmentation.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import logging
import math
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from kapao.augment import (Instances, PixelNoise, augment_hsv, fliplr, letterbox, mosaic4, random_affine,
                           resize_long_side)
from kapao.config import (IMAGE_SUFFIXES, MAX_STRIDE, DatasetConfig, Hyp, KeypointSchema, TargetLayout,
                          check_imgsz)
from kapao.errors import ConfigError, DataError
from kapao.runtime import atomic_write

LOGGER = logging.getLogger("kapao.data")
CACHE_VERSION = 2
KPT_CLIP_MARGIN = 0.02  # labelled keypoints up to this fraction of max(h, w) outside the image are clipped in
_EXIF_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


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

    def summary(self) -> str:
        """One line for the log."""
        line = (f"{self.images} images, {self.persons} persons ({self.box_only} box-only), {self.negatives} negatives, "
                f"{self.missing} missing + {self.corrupt} corrupt images skipped")
        extras = {"crowd annotations skipped": self.crowd_skipped, "zero-size boxes skipped": self.empty_boxes,
                  "keypoints clipped into the image": self.kpts_clipped, "keypoints far outside dropped": self.kpts_dropped,
                  "images whose size differs from the JSON (labels rescaled)": self.size_mismatch,
                  "annotations of image ids missing from 'images' skipped": self.orphan_annotations}
        return line + "".join(f", {v} {k}" for k, v in extras.items() if v)

    def to_array(self) -> np.ndarray:
        return np.array(dataclasses.astuple(self), np.int64)

    @classmethod
    def from_array(cls, a: np.ndarray) -> "DatasetStats":
        return cls(*(int(v) for v in a))


# ----------------------------------------------------------------------------------------------
def load_image(path: str | os.PathLike, apply_exif: bool = True) -> np.ndarray:
    """Read an image as BGR uint8 (H, W, 3): EXIF orientation applied, gray/RGBA/16-bit converted.

    Raises DataError naming the file when it is missing or cannot be decoded.
    """
    try:
        buf = np.fromfile(str(path), np.uint8)  # fromfile + imdecode also handles non-ASCII paths
    except OSError as e:
        raise DataError(f"cannot read image {path}: {e.strerror or e}; check that the file exists") from None
    flags = cv2.IMREAD_COLOR if apply_exif else cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    try:
        img = cv2.imdecode(buf, flags) if buf.size else None
    except cv2.error:  # e.g. more pixels than OpenCV accepts
        img = None
    if img is None:
        img = _load_with_pil(path, apply_exif)
    if img is None:
        raise DataError(f"cannot decode image {path}: the file is corrupt or not an image; remove or replace it")
    return img


def _load_with_pil(path: str | os.PathLike, apply_exif: bool) -> np.ndarray | None:
    """Fallback for formats OpenCV cannot decode."""
    from PIL import ImageOps

    try:
        with _pil_open(path) as im:
            im = ImageOps.exif_transpose(im) if apply_exif else im
            return cv2.cvtColor(np.asarray(im.convert("RGB")), cv2.COLOR_RGB2BGR)
    except Exception:  # noqa: BLE001 - any decoder failure means "not readable"
        return None


def _pil_open(path: str | os.PathLike):  # -> PIL.Image.Image
    """PIL's own Image.open. Importing ultralytics replaces it with a version that, on a file PIL cannot
    identify, tries to pip-install a HEIF plugin: a corrupt or foreign file must not install packages."""
    import sys

    from PIL import Image

    return getattr(sys.modules.get("ultralytics.utils.patches"), "_image_open", Image.open)(path)


def _probe_image(path: Path) -> tuple[str, tuple[int, int], tuple[int, int]]:
    """Cheap check without decoding pixels: ('ok'|'missing'|'corrupt', raw (h, w), EXIF-applied (h, w)).

    Reads the header with PIL and, for JPEGs, checks for the end-of-image marker in the last 1 KiB.
    """
    try:
        with _pil_open(path) as im:
            w, h = im.size
            fmt = im.format
            # (PNG is left out: PIL decodes the whole file to find its EXIF chunk)
            orientation = im.getexif().get(0x0112, 1) if fmt in ("JPEG", "MPO", "TIFF", "WEBP") else 1
            if fmt == "PNG":  # a truncated PNG has a valid header; only the chunk CRCs tell (no decoding)
                try:
                    im.verify()
                except Exception:  # noqa: BLE001 - PIL raises OSError/SyntaxError for broken chunks
                    return "corrupt", (0, 0), (0, 0)
        if fmt in ("JPEG", "MPO"):
            with open(path, "rb") as f:
                f.seek(max(0, path.stat().st_size - 1024))
                if b"\xff\xd9" not in f.read():
                    return "corrupt", (0, 0), (0, 0)
    except FileNotFoundError:
        return "missing", (0, 0), (0, 0)
    except Exception:  # noqa: BLE001 - PIL cannot read it: let OpenCV decide
        try:
            shape = load_image(path).shape[:2]
        except DataError:
            return ("corrupt" if path.exists() else "missing"), (0, 0), (0, 0)
        return "ok", shape, shape
    if w < 2 or h < 2:
        return "corrupt", (0, 0), (0, 0)
    return "ok", (h, w), ((w, h) if orientation in _EXIF_TRANSPOSED else (h, w))


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


def read_coco(ann_file: Path):  # -> pycocotools.coco.COCO
    """Load a COCO-format JSON with pycocotools (its progress prints silenced)."""
    from pycocotools.coco import COCO

    if not ann_file.is_file():
        raise DataError(f"annotation file not found: {ann_file}; check the dataset YAML's *_annotations entries")
    if ann_file.stat().st_size == 0:
        raise DataError(f"{ann_file} is empty (0 bytes); re-download or fix the file")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(ann_file))
    except OSError as e:
        raise DataError(f"cannot read {ann_file}: {e.strerror or e}; check its permissions") from None
    except (ValueError, AssertionError, KeyError, TypeError) as e:  # JSON syntax (ValueError) or structure
        why = f"an entry has no {e} key" if isinstance(e, KeyError) else str(e)
        raise DataError(f"{ann_file}: not a valid COCO-format JSON ({why}); re-download or fix the file") from None


def _person_category_ids(coco) -> set | None:
    """Ids of categories that define keypoints; None (= all annotations) when none do."""
    ids = {c["id"] for c in coco.dataset.get("categories", []) if c.get("keypoints")}
    return ids or None


def _parse_annotation(a: dict, img_hw: tuple[int, int], sxy: tuple[float, float], k: int, ann_file: Path,
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
        parsed = _parse_annotation(a, hw, sxy, k, ann_file, stats)
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


def parse_annotations(ann_file: Path, img_dir: Path, num_keypoints: int, skip_crowd: bool,
                      coco: Any = None, workers: int = 8) -> Labels:
    """Parse a COCO keypoint JSON and probe its images (threads). Raises DataError on bad annotations."""
    coco = coco if coco is not None else read_coco(ann_file)
    stats, k, cats = DatasetStats(), num_keypoints, _person_category_ids(coco)
    infos = list(coco.imgs.values())
    _check_images(infos, ann_file)
    stats.orphan_annotations = sum(len(v) for i, v in coco.imgToAnns.items() if i not in coco.imgs)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        jobs = pool.map(lambda info: _probe_image(img_dir / info["file_name"]), infos)
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


def _cache_paths(ann_file: Path, img_dir: Path, setup: str) -> list[Path]:
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
    hit. The cache key covers the JSON's size and mtime, the image file names, K, the crowd rule and
    the cache format version.
    """
    try:
        st = ann_file.stat()
    except FileNotFoundError:
        raise DataError(f"annotation file not found: {ann_file}; check the dataset YAML's *_annotations entries") from None
    if not img_dir.is_dir():
        raise DataError(f"image folder not found: {img_dir}; check the dataset YAML's path and split entries")
    setup = f"K={num_keypoints}|crowd={'skip' if skip_crowd else 'keep'}"
    key = f"{CACHE_VERSION}|{st.st_size}|{st.st_mtime_ns}|{setup}|{_listing_digest(img_dir)}"
    paths = _cache_paths(ann_file, img_dir, setup)
    for p in paths:
        labels = Labels.load(p, key)
        if labels is not None:
            return labels, None
    coco = read_coco(ann_file)
    labels = parse_annotations(ann_file, img_dir, num_keypoints, skip_crowd, coco=coco)
    for p in paths:
        try:
            labels.save(p, key)
            break
        except OSError:
            continue
    else:
        LOGGER.warning("could not write a label cache (tried %s); the next start parses %s again",
                       ", ".join(str(p.parent) for p in paths), ann_file.name)
    return labels, coco


# ----------------------------------------------------------------------------------------------
def build_targets(inst: Instances, img_hw: tuple[int, int], schema: KeypointSchema) -> np.ndarray:
    """Targets (M, 6 + 3K) of one image in TargetLayout order, image-index column 0 left at 0.

    Pose objects (class 0, kept persons): box cx, cy, w, h and K keypoints x, y, v, normalised to
    the image w/h. Keypoint objects (class k+1): a square of side kp_bbox * max(h, w) pixels
    centred on each visible keypoint k of every person, keypoint columns 0.
    """
    h, w = img_hw
    k, layout = schema.num_keypoints, TargetLayout(schema.num_keypoints)
    poses = np.zeros((int(inst.keep.sum()), layout.width), np.float32)
    b = inst.boxes[inst.keep]
    poses[:, layout.box] = np.stack([(b[:, 0] + b[:, 2]) / 2 / w, (b[:, 1] + b[:, 3]) / 2 / h,
                                     (b[:, 2] - b[:, 0]) / w, (b[:, 3] - b[:, 1]) / h], 1)
    kp = inst.keypoints[inst.keep].copy()
    kp[..., 0] /= w
    kp[..., 1] /= h
    poses[:, layout.kpt] = kp.reshape(-1, 3 * k)
    person, kid = np.nonzero(inst.keypoints[..., 2] > 0)
    objs = np.zeros((len(person), layout.width), np.float32)
    side = schema.kp_bbox * max(h, w)
    objs[:, layout.cls] = kid + 1
    objs[:, layout.box] = np.stack([inst.keypoints[person, kid, 0] / w, inst.keypoints[person, kid, 1] / h,
                                    np.full(len(person), side / w), np.full(len(person), side / h)], 1)
    return np.concatenate([poses, objs])


def rect_batch_shapes(shapes_hw: np.ndarray, batch_size: int, imgsz: int, pad: float,
                      stride: int = MAX_STRIDE) -> tuple[np.ndarray, np.ndarray]:
    """(order, batch shapes (nb, 2) h, w): images sorted by aspect ratio h/w, one stride-multiple
    input shape per batch that fits all its images at long side `imgsz` (+ `pad` strides)."""
    ar = shapes_hw[:, 0] / shapes_hw[:, 1]
    order = np.argsort(ar, kind="stable")
    ar = ar[order]
    nb = math.ceil(len(ar) / batch_size)
    rel = np.ones((nb, 2))
    for i in range(nb):
        a = ar[i * batch_size:(i + 1) * batch_size]
        if a.max() < 1:
            rel[i] = a.max(), 1
        elif a.min() > 1:
            rel[i] = 1, 1 / a.min()
    return order, (np.ceil(rel * imgsz / stride + pad).astype(np.int64) * stride)


# ----------------------------------------------------------------------------------------------
class PoseDataset(Dataset):
    """Images and KAPAO targets of one split of a COCO-format keypoint dataset.

    Item i: (image (3, H, W) uint8 RGB, targets (n, 6 + 3K) float32 in TargetLayout with column 0 = 0,
    meta). meta: image_id, path, orig_shape (h, w), and for un-augmented items ratio (rw, rh) and
    pad (padw, padh) with x_input = x_orig * rw + padw (None for augmented items), mosaic, flipped.
    """

    def __init__(self, cfg: DatasetConfig, split: str, imgsz: int, hyp: Hyp | None = None, augment: bool = False,
                 rect: bool = False, batch_size: int = 16, cache_images: bool = False) -> None:
        check_imgsz(imgsz)
        self.cfg, self.split, self.schema = cfg, split, cfg.schema
        self.img_dir, self.ann_file = cfg.require(split)
        self.imgsz, self.hyp, self.augment, self.rect = imgsz, hyp or Hyp(), augment, rect
        self.batch_size = batch_size
        self.mosaic = augment and not rect  # as official: rectangular batches never use mosaic
        # rect (official val.py --rect, pad 0): images sorted by aspect ratio, one input shape per batch
        if cfg.yolo is not None:  # Ultralytics txt labels (kapao.yolo_labels builds on this module)
            from kapao.yolo_labels import load_yolo_labels

            self.labels, self._coco = load_yolo_labels(cfg, split), None
        else:
            self.labels, self._coco = load_labels(self.ann_file, self.img_dir, self.schema.num_keypoints,
                                                  skip_crowd=split == "train")
        self.stats = self.labels.stats
        self._log_stats(cached=self._coco is None and cfg.yolo is None)
        n = len(self.labels)
        self.order = np.arange(n)
        self.batch_shapes: np.ndarray | None = None
        if rect and n:
            self.order, self.batch_shapes = rect_batch_shapes(self.labels.shapes, batch_size, imgsz, pad=0.0)
        self.image_ids = [v.item() for v in self.labels.image_ids[self.order]]
        self.files = [self.img_dir / str(f) for f in self.labels.files[self.order]]
        self.rng = np.random.default_rng(0)
        self.pixel_noise = PixelNoise(0) if augment else None
        self._imgs: list[tuple[np.ndarray, tuple[float, float]]] | None = None
        self._broken: set[int] = set()  # images that failed to decode after the start-up check
        if cache_images:
            self._cache_images()

    # -- setup -----------------------------------------------------------------------------------
    def _log_stats(self, cached: bool) -> None:
        where = " (label cache)" if cached else ""
        LOGGER.info("%s %s: %s%s", self.cfg.name, self.split, self.stats.summary(), where)
        listed = self.stats.images + len(self.labels.skipped)
        if listed == 0:
            raise DataError(f"no images for split '{self.split}' of {self.cfg.name}: {self.ann_file} lists none "
                            "(its 'images' list is empty or missing); fix or replace the annotation file")
        if self.stats.images == 0:
            raise DataError(f"no usable images for split '{self.split}' of {self.cfg.name}: none of the {listed} images "
                            f"that {self.ann_file} lists can be read under {self.img_dir} ({self.stats.missing} missing, "
                            f"{self.stats.corrupt} corrupt); check the dataset YAML's paths")
        if self.stats.persons == 0:
            LOGGER.warning("%s %s: %s has no usable person annotations; all %d images are negatives", self.cfg.name,
                           self.split, self.ann_file, self.stats.images)

    def _cache_images(self) -> None:
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            self._imgs = list(pool.map(self._read_resized, range(len(self.labels))))
        gb = sum(im.nbytes for im, _ in self._imgs) / 1e9
        LOGGER.info("%s %s: cached %d images in RAM (%.1f GB)", self.cfg.name, self.split, len(self._imgs), gb)

    def __getstate__(self) -> dict:
        """Workers started by spawn get no copy of the (large) COCO object; they never need it."""
        return {**self.__dict__, "_coco": None}

    @property
    def coco(self):  # -> pycocotools.coco.COCO, loaded on first use when the labels came from the cache
        if self._coco is None and self.cfg.yolo is not None:  # built from the txt labels (OKS area 0.53 x box)
            from kapao.yolo_labels import ground_truth

            self._coco = ground_truth(self.labels, self.schema)
        if self._coco is None:
            self._coco = read_coco(self.ann_file)
        return self._coco

    def reseed(self, seed: int) -> None:
        """Reset the augmentation random state (called per data-loader worker)."""
        self.rng = np.random.default_rng(seed)
        if self.pixel_noise is not None:
            self.pixel_noise.reseed(seed)

    # -- loading -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.order)

    def _read_resized(self, j: int) -> tuple[np.ndarray, tuple[float, float]]:
        """Image j (storage order) resized so its long side is imgsz; and the ratios (rw, rh).

        An image that passed the start-up check but cannot be decoded now becomes a grey image without
        labels (one warning per file and process), so one bad file never stops a run.
        """
        h0, w0 = self.labels.shapes[j]
        try:
            img = load_image(self.img_dir / str(self.labels.files[j]), bool(self.labels.apply_exif[j]))
        except DataError as e:
            if j not in self._broken:
                LOGGER.warning("%s; used as an empty grey image without labels", e)
            self._broken.add(j)
            img = np.full((int(h0), int(w0), 3), 114, np.uint8)
        shrink = self.imgsz < max(img.shape[:2]) and not self.augment
        img = resize_long_side(img, self.imgsz, cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        return img, (img.shape[1] / w0, img.shape[0] / h0)

    def _load(self, j: int) -> tuple[np.ndarray, Instances, tuple[float, float]]:
        """Image j resized (long side imgsz), its instances in those pixels, and the ratios (rw, rh)."""
        img, (rw, rh) = self._imgs[j] if self._imgs is not None else self._read_resized(j)
        inst = self.labels.instances(j)
        if j in self._broken:
            inst = Instances.empty(self.schema.num_keypoints)
        return img, inst.scaled(rw, rh), (rw, rh)

    def _load_mosaic(self, j: int) -> tuple[np.ndarray, Instances]:
        picks = [j, *self.rng.integers(0, len(self.labels), 3)]
        canvas, inst = mosaic4([self._load(int(p))[:2] for p in picks], self.imgsz, self.rng)
        return random_affine(canvas, inst, (self.imgsz, self.imgsz), self.hyp, self.rng)

    def _load_letterboxed(self, i: int, j: int) -> tuple[np.ndarray, Instances, dict]:
        img, inst, (r0w, r0h) = self._load(j)
        shape = tuple(self.batch_shapes[i // self.batch_size]) if self.rect else (self.imgsz, self.imgsz)
        img, (rw, rh), (pw, ph) = letterbox(img, shape, scaleup=self.augment)
        inst = inst.scaled(rw, rh, pw, ph)
        if self.augment:
            img, inst = random_affine(img, inst, img.shape[:2], self.hyp, self.rng)
            return img, inst, {"ratio": None, "pad": None}
        return img, inst, {"ratio": (r0w * rw, r0h * rh), "pad": (pw, ph)}

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
        j = int(self.order[i])
        meta = {"image_id": self.labels.image_ids[j].item(), "path": str(self.img_dir / str(self.labels.files[j])),
                "orig_shape": tuple(int(v) for v in self.labels.shapes[j]), "index": i, "mosaic": False, "flipped": False}
        if self.mosaic and self.rng.random() < self.hyp.mosaic:
            img, inst = self._load_mosaic(j)
            meta.update(ratio=None, pad=None, mosaic=True)
        else:
            img, inst, extra = self._load_letterboxed(i, j)
            meta.update(extra)
        if self.augment:
            img, inst, meta["flipped"] = self._photometric_and_flip(img, inst)
        targets = torch.from_numpy(build_targets(inst, img.shape[:2], self.schema))
        image = torch.from_numpy(np.stack(cv2.split(img)[::-1]))  # HWC BGR -> CHW RGB (fastest copy)
        return image, targets, meta

    def _photometric_and_flip(self, img: np.ndarray, inst: Instances) -> tuple[np.ndarray, Instances, bool]:
        if self.pixel_noise is not None:  # set it to None to switch the blur/gray extras off
            img = self.pixel_noise(img)
        augment_hsv(img, self.hyp.hsv_h, self.hyp.hsv_s, self.hyp.hsv_v, self.rng)
        flip = bool(self.rng.random() < self.hyp.fliplr)
        if flip:
            img, inst = fliplr(img, inst, self.schema.flip_index)
        return img, inst, flip


# ----------------------------------------------------------------------------------------------
def collate(batch: Sequence[tuple[torch.Tensor, torch.Tensor, dict]]) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Stack items: images (B, 3, H, W) uint8, targets (M, 6 + 3K) with column 0 = index in batch, metas."""
    images, targets, metas = zip(*batch)
    for b, t in enumerate(targets):
        t[:, TargetLayout.image] = b
    return torch.stack(images), torch.cat(targets), list(metas)


def _seed_worker(worker_id: int) -> None:
    """Per-worker seeding: torch gives each worker base_seed + id; numpy/random/albumentations follow it."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    cv2.setNumThreads(0)  # the workers are the parallelism; OpenCV threads would oversubscribe the CPU
    info = torch.utils.data.get_worker_info()
    if info is not None and hasattr(info.dataset, "reseed"):
        info.dataset.reseed(seed)


def build_dataloader(dataset: PoseDataset, batch_size: int, workers: int, shuffle: bool,
                     sampler: Sampler | None = None, seed: int = 0) -> DataLoader:
    """A DataLoader with `collate`, seeded shuffling and per-worker augmentation seeds.

    Workers are persistent; with workers=0 the dataset's own random state is reseeded from `seed`.
    Rectangular datasets need shuffle=False and the batch size they were built with.
    """
    if getattr(dataset, "rect", False) and (shuffle or batch_size != dataset.batch_size):
        raise ConfigError(f"rectangular batches need shuffle=False and batch_size={dataset.batch_size} "
                          f"(the dataset's), got shuffle={shuffle}, batch_size={batch_size}")
    g = torch.Generator()
    g.manual_seed(seed)
    if workers == 0 and hasattr(dataset, "reseed"):
        dataset.reseed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=workers, collate_fn=collate, pin_memory=torch.cuda.is_available(),
                      worker_init_fn=_seed_worker, generator=g, persistent_workers=workers > 0)
