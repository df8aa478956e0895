"""Dataset YAMLs read into :class:`~kapao.cfg.schema.DatasetConfig`: built-in names, `base:` chains,
relative roots, and Ultralytics YOLO-pose YAMLs (handed to :mod:`kapao.cfg.yolo`)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from kapao.cfg.schema import BUILTIN_DATASETS, SPLITS, DatasetConfig, KeypointSchema
from kapao.cfg.settings import builtin_config_file, read_yaml
from kapao.cfg.yolo import yolo_dataset_config
from kapao.errors import ConfigError

_DATASET_KEYS = {"base", "name", "path", *SPLITS, *(f"{s}_annotations" for s in SPLITS),
                 "kpt_names", "flip_idx", "sigmas", "skeleton", "kp_bbox"}


def check_dataset_spec(spec: str | os.PathLike) -> None:
    """ConfigError unless `spec` is a built-in dataset name or an existing file (nothing is read)."""
    text = str(spec)
    if text not in BUILTIN_DATASETS and not Path(text).expanduser().is_file():
        names = ", ".join(BUILTIN_DATASETS)
        raise ConfigError(f"dataset config '{text}' is neither a built-in name ({names}) nor an existing YAML file")


def resolve_dataset_yaml(spec: str | os.PathLike, depth: int = 0) -> tuple[dict[str, Any], str]:
    """Read a dataset YAML (short name or path) and merge it over its `base:` chain."""
    if depth > 4:
        raise ConfigError(f"dataset config {spec}: 'base:' chain is too deep (circular?)")
    text = str(spec)
    if text in BUILTIN_DATASETS:
        path, builtin = builtin_config_file(BUILTIN_DATASETS[text]), True
    else:
        check_dataset_spec(text)
        path, builtin = Path(text).expanduser(), False
    data = read_yaml(path)
    if "kpt_shape" in data and not builtin:  # an Ultralytics YOLO-pose YAML: kapao.cfg.yolo reads it
        return {**data, "yaml_file": str(path)}, str(path)
    unknown = set(data) - _DATASET_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(_DATASET_KEYS))}")
    # A relative root is resolved where it is written: next to a user's YAML, or, for a built-in
    # config, under $KAPAO_DATASETS (default: the current directory).
    if "path" in data:
        root = Path(str(data["path"])).expanduser()
        if not root.is_absolute():
            anchor = Path(os.environ.get("KAPAO_DATASETS", ".")) if builtin else path.parent
            root = anchor / root
        data["path"] = str(root)
    if "base" in data:  # like path:, a relative base: is read next to the YAML that names it
        base_spec = str(data.pop("base"))
        if not builtin and base_spec not in BUILTIN_DATASETS and not Path(base_spec).expanduser().is_absolute():
            base_spec = str(path.parent / base_spec)
        try:
            base, _ = resolve_dataset_yaml(base_spec, depth + 1)
        except ConfigError as e:
            raise ConfigError(f"{path}: base: {e}") from None
        base.pop("name")  # a derived dataset is named after its own file unless it says otherwise
        data = {**base, **data}
    data.setdefault("name", text if builtin else path.stem)
    return data, (f"built-in '{text}'" if builtin else str(path))


def load_dataset_config(spec: str | os.PathLike, *, single_cls: bool = False,
                        overrides: Mapping[str, Any] | None = None) -> DatasetConfig:
    """Load a dataset config by short name (`coco`, `crowdpose`) or YAML path.

    An Ultralytics YOLO-pose YAML (recognised by its `kpt_shape` key) is read by
    :func:`kapao.cfg.yolo.yolo_dataset_config`; `single_cls` merges its classes into one.
    `overrides` replace keys of the YAML (kapao check uses it to go on past a bad flip_idx).
    """
    data, source = resolve_dataset_yaml(spec)
    data = {**data, **(overrides or {})}
    if "kpt_shape" in data:
        return yolo_dataset_config(data, source, single_cls=single_cls)
    if "path" not in data:
        raise ConfigError(f"dataset config {source}: missing 'path' (the dataset root folder)")
    root = Path(data["path"])
    images = {s: root / str(data[s]) for s in SPLITS if data.get(s)}
    annotations = {s: root / str(data[f"{s}_annotations"]) for s in SPLITS if data.get(f"{s}_annotations")}
    schema = KeypointSchema.from_dict(data, where=f"dataset config {source}")
    return DatasetConfig(name=str(data["name"]), root=root, images=images, annotations=annotations,
                         schema=schema, source=source)


def resolve_schema(num_keypoints: int | None = None, data: str | os.PathLike | None = None) -> KeypointSchema:
    """The keypoint schema of a dataset config (``coco``, ``crowdpose`` or a YAML path), or else of a keypoint
    count (:meth:`KeypointSchema.for_count`, 17 when neither is given); both given must agree."""
    if data is None:
        return KeypointSchema.for_count(17 if num_keypoints is None else num_keypoints)
    schema = load_dataset_config(data).schema
    if num_keypoints is not None and num_keypoints != schema.num_keypoints:
        raise ConfigError(f"{num_keypoints} keypoints requested, but dataset config '{data}' has "
                          f"{schema.num_keypoints}; drop one of the two")
    return schema
