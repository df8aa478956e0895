"""The keypoint schema, head and target layouts, the dataset config type and the constants of the method.

Everything that depends on the keypoint count K is derived here from one :class:`KeypointSchema`:
the class count (1 + K), the head's channel layout and the training-target layout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

from kapao.cfg.settings import builtin_config_file, read_yaml
from kapao.errors import ConfigError, DataError

# ----------------------------------------------------------------------------------------------
# Constants of the method (facts from the official KAPAO models/training)
STRIDES: tuple[int, ...] = (8, 16, 32, 64)
ANCHORS: tuple[tuple[tuple[int, int], ...], ...] = (
    ((19, 27), (44, 40), (38, 94)),  # P3/8
    ((96, 68), (86, 152), (180, 137)),  # P4/16
    ((140, 301), (303, 264), (238, 542)),  # P5/32
    ((436, 615), (739, 380), (925, 792)),  # P6/64
)
OBJ_LEVEL_WEIGHTS: tuple[float, ...] = (4.0, 1.0, 0.25, 0.06)  # objectness loss weight per level
MAX_STRIDE = max(STRIDES)
DEFAULT_SIGMA = 0.05  # OKS sigma used for custom datasets that give none (documented in README)
BOX_AREA_FACTOR = 0.53  # OKS area of a person without segmentation area: 0.53 x box area (crowdpose-api, Ultralytics)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
PAD_VALUE = 114  # grey (uint8) of letterbox padding, mosaic background, affine borders and TTA padding
# The official test-time augmentation: input scales and, per scale, a left-right flip
OFFICIAL_TTA: tuple[tuple[float, ...], tuple[bool, ...]] = ((0.8, 1.0, 1.2), (False, True, False))
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".m4v", ".wmv", ".mpg", ".mpeg", ".webm")

BUILTIN_DATASETS = {"coco": "coco-kp.yaml", "crowdpose": "crowdpose.yaml"}
SPLITS = ("train", "val", "test")


MAX_IMGSZ = 8192  # input side above which a single image's activations no longer fit in memory anywhere


def check_imgsz(imgsz: int) -> int:
    """`imgsz` if it is a positive multiple of MAX_STRIDE (the network's input sides must be), else a
    ConfigError that suggests the nearest valid size."""
    if imgsz > MAX_IMGSZ:
        raise ConfigError(f"--imgsz {imgsz} is larger than {MAX_IMGSZ}, more memory than any machine has for this "
                          f"network (the models are trained at 640-1280; try 1280)")
    if imgsz <= 0 or imgsz % MAX_STRIDE:
        near = max(1, round(imgsz / MAX_STRIDE)) * MAX_STRIDE
        raise ConfigError(f"--imgsz {imgsz} is not a positive multiple of {MAX_STRIDE} (try {near})")
    return imgsz


def _yaml_list(d: Mapping[str, Any], key: str, kind: type, where: str) -> list:
    """d[key] as a list of `kind` (int, float or str); a ConfigError naming the key otherwise."""
    value = d[key]
    what = {int: "integers", float: "numbers", str: "names"}[kind]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: '{key}' must be a list of {what}, got {value!r}")
    try:
        if kind is int and any(isinstance(v, bool) or float(v) != int(v) for v in value):
            raise ValueError
        if kind is float and any(isinstance(v, (bool, str)) for v in value):
            raise ValueError
        return [v if kind is str else kind(v) for v in value]
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: '{key}' must be a list of {what}, got {list(value)!r}") from None


# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KeypointSchema:
    """The keypoint definition of a dataset; the single source of K, flip order and OKS sigmas."""

    names: tuple[str, ...]
    flip_index: tuple[int, ...]  # flip_index[k] = keypoint that k becomes after a left-right flip
    sigmas: tuple[float, ...]  # OKS sigmas, one per keypoint
    skeleton: tuple[tuple[int, int], ...] = ()  # 0-based keypoint pairs, for drawing only
    kp_bbox: float = 0.05  # keypoint-object side as a fraction of max(input h, w)

    def __post_init__(self) -> None:
        k = len(self.names)
        if k < 1:
            raise ConfigError("keypoint schema: 'kpt_names' must list at least one keypoint")
        if len(set(self.names)) != k:
            raise ConfigError("keypoint schema: 'kpt_names' has duplicate names")
        if sorted(self.flip_index) != list(range(k)):
            raise ConfigError(f"keypoint schema: 'flip_idx' must be a permutation of 0..{k - 1}, got {list(self.flip_index)}")
        if any(self.flip_index[self.flip_index[i]] != i for i in range(k)):
            raise ConfigError("keypoint schema: 'flip_idx' must swap pairs (applying it twice must give the identity)")
        if len(self.sigmas) != k or any(s <= 0 for s in self.sigmas):
            raise ConfigError(f"keypoint schema: 'sigmas' needs {k} positive values, got {len(self.sigmas)}")
        for a, b in self.skeleton:
            if not (0 <= a < k and 0 <= b < k):
                raise ConfigError(f"keypoint schema: skeleton edge ({a}, {b}) is outside 0..{k - 1}")
        if not 0 < self.kp_bbox < 1:
            raise ConfigError(f"keypoint schema: 'kp_bbox' must be in (0, 1), got {self.kp_bbox}")

    @property
    def num_keypoints(self) -> int:
        return len(self.names)

    @property
    def num_classes(self) -> int:
        """Person class plus one keypoint-object class per keypoint type."""
        return 1 + len(self.names)

    @property
    def class_names(self) -> tuple[str, ...]:
        return ("person", *self.names)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kpt_names": list(self.names),
            "flip_idx": list(self.flip_index),
            "sigmas": list(self.sigmas),
            "skeleton": [list(e) for e in self.skeleton],
            "kp_bbox": self.kp_bbox,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str = "config") -> "KeypointSchema":
        """Build from YAML keys (lists of the right kind are checked here, with the key named in the
        error); missing sigmas fall back to DEFAULT_SIGMA with a warning."""
        if "kpt_names" not in d:
            raise ConfigError(f"{where}: missing 'kpt_names' (the list of keypoint names)")
        names = tuple(str(n) for n in _yaml_list(d, "kpt_names", str, where))
        if d.get("flip_idx") is None:
            raise ConfigError(f"{where}: missing 'flip_idx' (left-right flip permutation; use 0..K-1 if there are no pairs)")
        if d.get("sigmas") is None:
            import warnings  # shown by the CLI as one `warning: …` line (runtime.quiet_third_party)

            warnings.warn(f"{where}: no 'sigmas' given; using {DEFAULT_SIGMA} for every keypoint in OKS", stacklevel=2)
            sigmas = (DEFAULT_SIGMA,) * len(names)
        else:
            sigmas = tuple(_yaml_list(d, "sigmas", float, where))
            if not all(math.isfinite(v) for v in sigmas):
                raise ConfigError(f"{where}: 'sigmas' must be finite positive numbers, got {list(sigmas)}")
        skeleton = d.get("skeleton") or []
        try:
            edges = tuple((int(a), int(b)) for a, b in skeleton)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: 'skeleton' must be a list of [a, b] keypoint index pairs") from None
        try:
            kp_bbox = float(d.get("kp_bbox", 0.05))
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: 'kp_bbox' must be a number in (0, 1), got {d.get('kp_bbox')!r}") from None
        flip = tuple(_yaml_list(d, "flip_idx", int, where))
        try:
            return cls(names=names, flip_index=flip, sigmas=sigmas, skeleton=edges, kp_bbox=kp_bbox)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    @classmethod
    def generic(cls, num_keypoints: int) -> "KeypointSchema":
        """Keypoints kp0..kp{K-1}, no left/right pairs, the default OKS sigma."""
        k = _check_count(num_keypoints)
        return cls(names=tuple(f"kp{i}" for i in range(k)), flip_index=tuple(range(k)), sigmas=(DEFAULT_SIGMA,) * k)

    @classmethod
    def builtin(cls, dataset: str) -> "KeypointSchema":
        """The schema of a built-in dataset (``coco``, ``crowdpose``), read from its YAML."""
        if dataset not in BUILTIN_DATASETS:
            raise ConfigError(f"unknown built-in dataset '{dataset}'; choose one of {', '.join(BUILTIN_DATASETS)}")
        return cls.from_dict(read_yaml(builtin_config_file(BUILTIN_DATASETS[dataset])), where=f"built-in '{dataset}'")

    @classmethod
    def for_count(cls, num_keypoints: int) -> "KeypointSchema":
        """The built-in schema with K keypoints: COCO for 17, CrowdPose for 14, else :meth:`generic`."""
        dataset = _BUILTIN_BY_COUNT.get(_check_count(num_keypoints))
        return cls.builtin(dataset) if dataset else cls.generic(num_keypoints)

    @classmethod
    def from_names(cls, names: Sequence[str]) -> "KeypointSchema":
        """The schema for known keypoint names (e.g. read from weights without a schema).

        Names equal to a built-in dataset's give that dataset's schema (flip pairs, sigmas, skeleton);
        other names get left/right flip pairs guessed from the names (``left_x`` <-> ``right_x``; none
        if the guess is not a set of pairs) and the default sigma.
        """
        names = tuple(str(n) for n in names)
        for dataset in BUILTIN_DATASETS:
            schema = cls.builtin(dataset)
            if schema.names == names:
                return schema
        index = {n: i for i, n in enumerate(names)}
        flip = []
        for i, n in enumerate(names):
            for a, b in (("left", "right"), ("right", "left")):
                if a in n and n.replace(a, b) in index:
                    flip.append(index[n.replace(a, b)])
                    break
            else:
                flip.append(i)
        if any(flip[flip[i]] != i for i in range(len(flip))):
            flip = list(range(len(names)))
        return cls(names=names, flip_index=tuple(flip), sigmas=(DEFAULT_SIGMA,) * len(names))

    @classmethod
    def infer(cls, num_keypoints: int, names: Sequence[str] | None = None) -> "KeypointSchema":
        """The schema of weights with K keypoints and (optionally) their names: :meth:`from_names`
        when names are known, else :meth:`for_count`."""
        if names is None:
            return cls.for_count(num_keypoints)
        names = tuple(names)
        if len(names) != num_keypoints:
            raise ConfigError(f"{len(names)} keypoint names given for {num_keypoints} keypoints")
        return cls.from_names(names)


_BUILTIN_BY_COUNT = {17: "coco", 14: "crowdpose"}  # keypoint count -> built-in dataset with that many


def _check_count(num_keypoints: int) -> int:
    if int(num_keypoints) < 1:
        raise ConfigError(f"the number of keypoints must be at least 1, got {num_keypoints}")
    return int(num_keypoints)


@dataclass(frozen=True)
class HeadLayout:
    """Channel layout of one anchor's prediction vector: box(4), objectness(1), classes(1+K), keypoints(2K).

    Every consumer (decode, loss, export) slices predictions through this, never by literal offsets.
    """

    num_keypoints: int

    box: ClassVar[slice] = slice(0, 4)  # x, y, w, h
    obj: ClassVar[int] = 4

    @property
    def num_classes(self) -> int:
        return 1 + self.num_keypoints

    @property
    def cls(self) -> slice:
        return slice(5, 5 + self.num_classes)

    @property
    def kpt(self) -> slice:
        start = 5 + self.num_classes
        return slice(start, start + 2 * self.num_keypoints)

    @property
    def num_outputs(self) -> int:
        return 5 + self.num_classes + 2 * self.num_keypoints


@dataclass(frozen=True)
class TargetLayout:
    """Columns of the collated training-target tensor (M, 6 + 3K), one row per object.

    [image index in batch, class, cx, cy, w, h, x_1, y_1, v_1, ..., x_K, y_K, v_K]; coordinates are
    normalised to the network-input width/height (0..1). Class 0 rows are pose objects (box + K
    keypoints); class k+1 rows are keypoint objects of keypoint k, whose keypoint columns are all 0.
    """

    num_keypoints: int

    image: ClassVar[int] = 0
    cls: ClassVar[int] = 1
    box: ClassVar[slice] = slice(2, 6)

    @property
    def kpt(self) -> slice:
        return slice(6, 6 + 3 * self.num_keypoints)

    @property
    def width(self) -> int:
        return 6 + 3 * self.num_keypoints


# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class YoloLayout:
    """What an Ultralytics YOLO-pose data YAML adds to a dataset (kapao.cfg.yolo, kapao.data.yolo_labels).

    Labels are one txt file per image (rows `class cx cy w h x1 y1 [v1] ...`, normalised), found by
    Ultralytics' images/ -> labels/ path rule; `ndim` is 2 (x, y) or 3 (x, y, visibility).
    """

    sources: Mapping[str, tuple[Path, ...]]  # split -> image folders and/or .txt image lists
    classes: tuple[str, ...]  # the YAML's class names; kapao trains one pose class (see single_cls)
    ndim: int  # values per keypoint in the label rows: 2 or 3
    single_cls: bool = False  # all classes merged into one pose class


@dataclass(frozen=True)
class DatasetConfig:
    """A dataset YAML, resolved: root folder, per-split image folders and annotation files, schema.

    For a YOLO-pose YAML (`yolo` set), images[split] is the root (image paths are relative to it)
    and annotations[split] the split's first image folder or list.
    """

    name: str
    root: Path
    images: Mapping[str, Path]  # split -> image folder
    annotations: Mapping[str, Path]  # split -> COCO-format keypoint JSON
    schema: KeypointSchema
    source: str  # where the config came from (file path or built-in name)
    yolo: YoloLayout | None = None  # set for Ultralytics YOLO-pose datasets

    @property
    def format(self) -> str:
        """'coco' (keypoint JSON) or 'yolo' (Ultralytics txt labels)."""
        return "coco" if self.yolo is None else "yolo"

    def split(self, split: str) -> tuple[Path, Path]:
        """(image folder, annotation file) of a split, with an error saying what is missing."""
        if split not in self.images or split not in self.annotations:
            have = sorted(set(self.images) & set(self.annotations))
            raise ConfigError(f"dataset {self.name} ({self.source}) has no '{split}' split; it has: {', '.join(have) or 'none'}")
        return self.images[split], self.annotations[split]

    def require(self, split: str) -> tuple[Path, Path]:
        """Like :meth:`split`, but the folder and file must exist; the error says how to get the data."""
        for path in self.split(split):
            if not path.exists():
                how = (f"download it with `kapao download {self.name} {self.root}`, or point "
                       f"$KAPAO_DATASETS at the folder holding datasets/{self.name}" if self.name in BUILTIN_DATASETS
                       else f"check 'path' and the '{split}' entries of {self.source}")
                raise DataError(f"dataset {self.name}: {path} not found ({split} split); {how}")
        return self.split(split)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "path": str(self.root)}
        if self.yolo is not None:
            d.update({s: [str(p) for p in v] for s, v in self.yolo.sources.items()},
                     names=list(self.yolo.classes), single_cls=self.yolo.single_cls,
                     kpt_shape=[self.schema.num_keypoints, self.yolo.ndim])
            return {**d, **self.schema.to_dict()}
        for s in SPLITS:
            if s in self.images:
                d[s] = str(self.images[s])
            if s in self.annotations:
                d[f"{s}_annotations"] = str(self.annotations[s])
        return {**d, **self.schema.to_dict()}
