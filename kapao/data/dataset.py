"""Training/validation data: COCO-format keypoint JSON + images -> augmented images and KAPAO targets.

Labels come from :mod:`kapao.data.labels` (parsed from the JSON, cached). Targets follow
:class:`kapao.cfg.schema.TargetLayout`: one pose object (class 0: box + K keypoints) per person and one
keypoint object (class k+1, a square box) per visible keypoint, built after augmentation.
"""
from __future__ import annotations

import logging
import math
import random
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from kapao.cfg.schema import MAX_STRIDE, PAD_VALUE, DatasetConfig, KeypointSchema, TargetLayout, check_imgsz
from kapao.cfg.settings import Hyp
from kapao.data.augment import Instances, PixelNoise, augment_hsv, fliplr, mosaic4, random_affine
from kapao.data.labels import load_labels, read_coco
from kapao.data.letterbox import letterbox, resize_long_side
from kapao.data.sources import load_image
from kapao.errors import ConfigError, DataError
from kapao.runtime import cpu_count

LOGGER = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
def encode_targets(inst: Instances, img_hw: tuple[int, int], schema: KeypointSchema) -> np.ndarray:
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
        if cfg.yolo is not None:  # Ultralytics txt labels (kapao.data.yolo_labels builds on this module)
            from kapao.data.yolo_labels import load_yolo_labels

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
        with ThreadPoolExecutor(min(8, cpu_count())) as pool:
            self._imgs = list(pool.map(self._read_resized, range(len(self.labels))))
        gb = sum(im.nbytes for im, _ in self._imgs) / 1e9
        LOGGER.info("%s %s: cached %d images in RAM (%.1f GB)", self.cfg.name, self.split, len(self._imgs), gb)

    def __getstate__(self) -> dict:
        """Workers started by spawn get no copy of the (large) COCO object; they never need it."""
        return {**self.__dict__, "_coco": None}

    @property
    def coco(self) -> Any:  # pycocotools.coco.COCO, loaded on first use when the labels came from the cache
        if self._coco is None and self.cfg.yolo is not None:  # built from the txt labels (OKS area 0.53 x box)
            from kapao.data.yolo_labels import ground_truth

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
            img = np.full((int(h0), int(w0), 3), PAD_VALUE, np.uint8)
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
        assert self.batch_shapes is not None or not self.rect  # set in __init__ whenever rect
        shape = (tuple(self.batch_shapes[i // self.batch_size]) if self.rect and self.batch_shapes is not None
                 else (self.imgsz, self.imgsz))
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
        targets = torch.from_numpy(encode_targets(inst, img.shape[:2], self.schema))
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


def build_dataloader(dataset: Dataset, batch_size: int, workers: int, shuffle: bool,
                     sampler: Sampler | None = None, seed: int = 0) -> DataLoader:
    """A DataLoader with `collate`, seeded shuffling and per-worker augmentation seeds.

    Workers are persistent and at most the CPUs available (more only slow the machine down, and torch
    warns about them); with workers=0 the dataset's own random state is reseeded from `seed`.
    Rectangular datasets need shuffle=False and the batch size they were built with.
    """
    workers = min(workers, cpu_count())
    if isinstance(dataset, PoseDataset) and dataset.rect and (shuffle or batch_size != dataset.batch_size):
        raise ConfigError(f"rectangular batches need shuffle=False and batch_size={dataset.batch_size} "
                          f"(the dataset's), got shuffle={shuffle}, batch_size={batch_size}")
    g = torch.Generator()
    g.manual_seed(seed)
    if workers == 0 and hasattr(dataset, "reseed"):
        dataset.reseed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=workers, collate_fn=collate, pin_memory=torch.cuda.is_available(),
                      worker_init_fn=_seed_worker, generator=g, persistent_workers=workers > 0)
