"""Ultralytics YOLO-pose data YAMLs read as kapao dataset configs (the labels: kapao.data.yolo_labels).

The YAML `yolo pose train` reads (and Roboflow, CVAT and Label Studio export): `path`,
`train`/`val`/`test` (image folders, `.txt` image lists, or lists of both), `kpt_shape: [K, 2|3]`,
`flip_idx`, `names` and optionally `kpt_names` (a list, or one per class). kapao also reads
`skeleton`, `sigmas`, `kp_bbox` and `single_cls` from it when present. It is recognised by its
`kpt_shape` key (:func:`is_yolo_pose`); :func:`kapao.cfg.dataset.load_dataset_config` hands it here.

Paths: `path` is relative to the YAML's folder (kapao's rule; Ultralytics' own first choice, a folder
of that name under the current directory, is used when the former does not exist); split entries are
relative to `path`, and Roboflow's `../train/images` is also found as `train/images`.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Mapping

from kapao.cfg.schema import SPLITS, DatasetConfig, KeypointSchema, YoloLayout
from kapao.errors import ConfigError

LOGGER = logging.getLogger(__name__)

YOLO_KEYS = {"path", *SPLITS, "minival", "names", "nc", "kpt_shape", "flip_idx", "kpt_names", "download",
             "channels", "roboflow", "yaml_file", "name", "sigmas", "skeleton", "kp_bbox", "single_cls"}


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
    shape: Any = data.get("kpt_shape")
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
        return KeypointSchema.generic(k).names
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
    """The keypoint schema of a YOLO-pose YAML: its keys translated to kapao's (K from kpt_shape; flip,
    names, sigmas, skeleton if given) and built by :meth:`KeypointSchema.from_dict`."""
    k, _ = kpt_shape(data, where)
    flip = data.get("flip_idx")
    if flip is None:
        warnings.warn(f"{where}: no 'flip_idx'; left-right flips will not swap any keypoints (add flip_idx, or "
                      "--hyp-set fliplr=0 if the keypoints have left/right pairs)", stacklevel=3)
        flip = list(range(k))
    if len(flip) != k:
        raise ConfigError(f"{where}: 'flip_idx' has {len(flip)} entries but kpt_shape says K={k}")
    keys = {"kpt_names": keypoint_names(data, k, where), "flip_idx": flip,
            **{key: data[key] for key in ("sigmas", "skeleton", "kp_bbox") if data.get(key) is not None}}
    try:
        return KeypointSchema.from_dict(keys, where=where)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # e.g. a sigma that is not a number
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
