"""One weights file read without running code: a kapao checkpoint (weights-only torch.load), an official
KAPAO checkpoint (the restricted unpickler), or a plain state_dict; into a float32 state_dict and its info."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from torch import Tensor

from kapao.cfg.schema import KeypointSchema
from kapao.errors import ConfigError, WeightsError
from kapao.weights.checkpoint import (
    CHECKPOINT_VERSION,
    _PickledObjects,
    _torch_load_weights_only,
    infer_num_keypoints,
    infer_size,
    is_kapao_checkpoint,
)
from kapao.weights.detector import detector_from_state_dict, is_detector_checkpoint, read_detector
from kapao.weights.official import load_official_checkpoint, read_official


def read_weights_file(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The float32 state_dict and info (format, size, schema, epoch, ...) of one weights file.

    format: 'kapao', 'official' (an official KAPAO file), 'state_dict' (of a KAPAO network) or 'detector'
    (a YOLOv5 P6 box detector, pickled or its state_dict: a start for training only; schema None).
    """
    try:
        obj = _torch_load_weights_only(path)
    except _PickledObjects:  # pickled modules: an official checkpoint (or worse), read restricted
        ckpt = load_official_checkpoint(path)
        return read_detector(ckpt, path) if is_detector_checkpoint(ckpt) else read_official(path, ckpt)
    return _interpret_data(obj, path)


def _interpret_data(obj: Any, path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A weights-only-loaded object: a kapao checkpoint or a (wrapped) plain state_dict."""
    if is_kapao_checkpoint(obj):
        if int(obj.get("format_version", 0)) > CHECKPOINT_VERSION:
            raise WeightsError(f"{path}: kapao checkpoint format {obj['format_version']} is newer than this "
                               "kapao supports; upgrade kapao")
        config = dict(obj["config"])
        try:
            schema = (KeypointSchema.from_dict(config["schema"], where=f"{path} config") if config.get("schema")
                      else KeypointSchema.for_count(int(config["num_keypoints"])))
        except (KeyError, ConfigError) as e:
            raise WeightsError(f"{path}: kapao checkpoint has an invalid model config ({e})") from None
        extra = obj.get("extra") or {}
        light = {k: v for k, v in extra.items() if not _holds_tensors(v)}
        return dict(obj["state_dict"]), {"format": "kapao", "size": config.get("size"), "config": config,
                                         "schema": schema, "epoch": light.get("epoch"), "extra": light}
    sd = obj
    if isinstance(obj, Mapping) and not _is_state_dict(obj):
        sd = next((obj[k] for k in ("state_dict", "model", "ema") if _is_state_dict(obj.get(k))), None)
    if not _is_state_dict(sd):
        raise WeightsError(f"{path} is not a kapao checkpoint, an official KAPAO checkpoint or a state_dict of "
                           "tensors; pass a file written by `kapao train` or an official kapao_*.pt")
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    size, k = infer_size(sd), infer_num_keypoints(sd)
    if size is None or k is None:
        detector = detector_from_state_dict(sd, path)
        if detector is not None:
            return sd, detector
        raise WeightsError(f"{path}: a state_dict, but not of a KAPAO network (cannot find the stem conv "
                           "'model.0.conv.conv.weight' or the head 'model.33.m.0.weight')")
    return sd, {"format": "state_dict", "size": size, "schema": KeypointSchema.for_count(k), "epoch": None}


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def _holds_tensors(v: Any) -> bool:
    if isinstance(v, Tensor):
        return True
    if isinstance(v, Mapping):
        return any(_holds_tensors(x) for x in v.values())
    if isinstance(v, (list, tuple)):
        return any(_holds_tensors(x) for x in v)
    return False
