"""The one entry point for weights: :func:`load_model` (and :func:`load_weights` without a model)
reads any weights spec — a kapao checkpoint, an official KAPAO file, a plain state_dict, or a
registered name — into a float32 state_dict, its keypoint schema and a model."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from kapao.cfg.schema import KeypointSchema
from kapao.errors import WeightsError
from kapao.weights.checkpoint import build_and_load, check_compatible
from kapao.weights.detector import DETECTOR_FORMAT
from kapao.weights.download import resolve_weights
from kapao.weights.reader import read_weights_file
from kapao.weights.registry import DEFAULT_WEIGHTS, DETECTORS, REGISTRY, PathLike, check_weights_spec

if TYPE_CHECKING:
    from kapao.models.network import KapaoModel


def load_weights(spec: PathLike, *, schema: KeypointSchema | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The float32 state_dict and info of a weights spec (see :func:`load_model`), without a model.

    A YOLOv5 detector (format 'detector', a start for training) has no keypoint schema: ``schema`` is
    not checked against it and info's schema stays None.
    """
    path, name = resolve_weights(spec)
    state_dict, info = read_weights_file(path)
    info.update(path=str(path), name=name)
    if info["format"] == DETECTOR_FORMAT:
        info.update(num_keypoints=None, keypoint_names=None)
        return state_dict, info
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


def load_model(spec: PathLike = DEFAULT_WEIGHTS, device: Any = "cpu", *,
               schema: KeypointSchema | None = None) -> tuple[KapaoModel, dict[str, Any]]:
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
    if check_weights_spec(spec)[1] in DETECTORS:  # say so before downloading it
        raise WeightsError(f"{spec} is a YOLOv5 object detector, not a KAPAO pose model: it predicts no keypoints. "
                           f"It is a start for training: `kapao train --weights {spec}`")
    state_dict, info = load_weights(spec, schema=schema)
    if info["format"] == DETECTOR_FORMAT:
        raise WeightsError(f"{info['path']} is a YOLOv5 object detector ({info['nc']} classes, size {info['size']}), "
                           "not a KAPAO pose model: it predicts no keypoints. It is a start for training: "
                           f"`kapao train --weights {info['name'] or info['path']}`")
    model = build_and_load(state_dict, info, Path(info["path"]), device)
    return model, info
