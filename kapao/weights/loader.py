"""The one entry point for weights: :func:`load_model` (and :func:`load_weights` without a model)
reads any weights spec — a kapao checkpoint, an official KAPAO file, a plain state_dict, or a
registered name — into a float32 state_dict, its keypoint schema and a model."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from torch import Tensor, nn

from kapao.cfg.schema import KeypointSchema
from kapao.errors import ConfigError, WeightsError
from kapao.weights.checkpoint import (
    CHECKPOINT_VERSION, _PickledObjects, _torch_load_weights_only, build_and_load, check_compatible,
    infer_num_keypoints, infer_size, is_kapao_checkpoint,
)
from kapao.weights.official import read_official
from kapao.weights.registry import DEFAULT_WEIGHTS, REGISTRY, PathLike, resolve_weights


def load_weights(spec: PathLike, *, schema: KeypointSchema | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The float32 state_dict and info of a weights spec (see :func:`load_model`), without a model."""
    path, name = resolve_weights(spec)
    try:
        obj = _torch_load_weights_only(path)
    except _PickledObjects:  # pickled modules: an official checkpoint (or worse), read restricted
        state_dict, info = read_official(path)
    else:
        state_dict, info = _interpret_data(obj, path)
    info.update(path=str(path), name=name)
    if name is not None:  # a named official weight: its dataset's schema and input size
        entry = REGISTRY[name]
        check_compatible(info["schema"], entry.schema, what=f"{path}")
        info.update(schema=entry.schema, imgsz=entry.imgsz)
    if schema is not None:
        check_compatible(info["schema"], schema, what=f"the weights {path}")
        if info["schema"].names != schema.names and all(n.startswith("kp") for n in info["schema"].names):
            info["schema"] = schema  # unnamed keypoints take the data's names
    info["num_keypoints"] = info["schema"].num_keypoints
    info["keypoint_names"] = list(info["schema"].names)
    return state_dict, info


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


def load_model(spec: PathLike = DEFAULT_WEIGHTS, device: Any = "cpu", *,
               schema: KeypointSchema | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Build the network for any weights spec and load them: the one entry point for weights.

    ``spec``: a kapao checkpoint, an official KAPAO checkpoint (recognised by content), a plain
    state_dict file, or a name ``kapao_{s,m,l}_{coco,crowdpose}`` (resolved in the weights cache,
    downloaded once if missing; crowdpose names use CrowdPose's schema, coco names COCO's).
    ``schema``: the keypoint schema of the data to be used; a different keypoint count raises
    WeightsError (see :func:`check_compatible`).

    Returns (model in eval mode, float32, on ``device``; info) where info has format ('kapao',
    'official', 'state_dict'), path, name, size, num_keypoints, keypoint_names, schema, epoch, and
    imgsz (named weights: their native input size), and per format: config/extra (kapao),
    anchors/bn_eps/best_fitness (official).
    """
    state_dict, info = load_weights(spec, schema=schema)
    model = build_and_load(state_dict, info, Path(info["path"]), device)
    return model, info
