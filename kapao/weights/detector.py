"""YOLOv5 P6 object detectors (YOLOv5's COCO-pretrained ``yolov5s6.pt`` …) as the start of training.

KAPAO's network is YOLOv5's P6 detector (v5.0 ``yolov5*6.yaml``) with a wider head, and the official
recipe fine-tunes from those detectors. A release file is a dict whose ``model`` entry is a pickled
``models.yolo.Model`` (FP16); it is read through the same restricted unpickler as official KAPAO files
(:func:`kapao.weights.official.load_official_checkpoint`: no pickled code runs). Its state_dict names
are kapao's (``model.{i}.…``), so the names map one to one.

What is transferred (:func:`detector_transfer`): the official ``train.py`` rule, ``intersect_dicts``
— every tensor whose name and shape equal the model's, anchors included (the README's commands exclude
nothing) — with one guard: the tensor's layer must be of the same kind in both networks. For a v5.0
file the guard changes nothing (every layer matches: all but the head's four output convolutions,
whose 3 x 85 channels are not 3 x (6 + 3K), i.e. 463 of kapao-s's 471 entries; the official count, 464 of
472, includes the ``anchor_grid`` buffer kapao does not keep). For a v6.0+ file (6x6 Conv stem instead of
Focus, 6 bottlenecks in layer 4, C3 then SPPF at layers 10-11) it keeps the C3/SPPF 1x1 convolutions
out of kapao's SPP/C3 at layers 10-11, whose shapes happen to agree.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from torch import Tensor, nn

from kapao.errors import UsageError, WeightsError
from kapao.weights.official import detect_layer, module_state_dict
from kapao.weights.unpickle import StandIn

DETECTOR_FORMAT = "detector"
_LAYER = re.compile(r"model\.(\d+)\.")


def is_detector_checkpoint(ckpt: Mapping[str, Any]) -> bool:
    """True when a (restricted-unpickled) checkpoint's Detect head has ``no = nc + 5`` outputs per anchor:
    a YOLOv5 box detector (KAPAO heads have ``no = nc + 5 + 2K``)."""
    node = ckpt.get("model") if isinstance(ckpt.get("model"), StandIn) else ckpt.get("ema")
    if not isinstance(node, StandIn):
        return False
    layers = node.children.get("model")
    detect = list(layers.children.values())[-1] if isinstance(layers, StandIn) and layers.children else None
    nc, no = (detect.get("nc"), detect.get("no")) if isinstance(detect, StandIn) else (None, None)
    return isinstance(nc, int) and isinstance(no, int) and no == nc + 5


def read_detector(ckpt: Mapping[str, Any], path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(float32 state_dict, info) of a pickled YOLOv5 detector; info = {format 'detector', size, version,
    nc, layer_kinds (index -> class name), epoch}.

    The ``model`` entry is read, as the official ``train.py`` does (release files hold no ``ema``).
    """
    root = ckpt.get("model") if isinstance(ckpt.get("model"), StandIn) else ckpt.get("ema")
    if not isinstance(root, StandIn):
        raise WeightsError(f"{path}: holds no pickled model (neither 'model' nor 'ema'); not a YOLOv5 detector file")
    raw: dict[str, Tensor] = {}
    module_state_dict(root, "", raw, path)
    detect, _ = detect_layer(root, path)
    sd = {k: (v.detach().float().contiguous() if v.is_floating_point() else v.detach().clone())
          for k, v in raw.items()}
    kinds = {i: n.qualname.rsplit(".", 1)[-1] for i, n in enumerate(root.children["model"].children.values())
             if isinstance(n, StandIn)}
    info = _describe(sd, path, int(detect.get("nc")), kinds)
    info["epoch"] = ckpt.get("epoch") if isinstance(ckpt.get("epoch"), int) else None
    return sd, info


def detector_from_state_dict(sd: Mapping[str, Tensor], path: Path) -> dict[str, Any] | None:
    """The info of a plain state_dict of a YOLOv5 P6 detector, or None when it is not one."""
    head = _head_index(sd)
    anchors = sd.get(f"model.{head}.anchors") if head is not None else None
    out = sd.get(f"model.{head}.m.0.weight") if head is not None else None
    if anchors is None or out is None or anchors.ndim != 3:
        return None
    na = anchors.shape[1]
    if out.shape[0] % na or out.shape[0] // na <= 5:
        return None
    return _describe(sd, path, out.shape[0] // na - 5, {})


def _head_index(sd: Mapping[str, Tensor]) -> int | None:
    idx = [int(m.group(1)) for k in sd if (m := _LAYER.match(k)) and k.endswith(".anchors")]
    return max(idx) if idx else None


def _describe(sd: Mapping[str, Tensor], path: Path, nc: int, names: Mapping[int, str]) -> dict[str, Any]:
    head = _head_index(sd)
    anchors = sd.get(f"model.{head}.anchors")
    if anchors is None or anchors.ndim != 3 or anchors.shape[0] != 4:
        levels = anchors.shape[0] if anchors is not None and anchors.ndim == 3 else "?"
        raise WeightsError(f"{path}: a YOLOv5 detector with {levels} output levels, not a P6 one (4 levels, strides "
                           "8-64): kapao starts only from P6 detectors such as yolov5s6.pt")
    kinds = layer_kinds(sd)
    for i, name in names.items():  # the pickled class names tell SPP from SPPF (same tensors)
        if kinds.get(i) == "SPP" and name in ("SPP", "SPPF"):
            kinds[i] = name
    if kinds.get(0) not in ("Focus", "Conv"):
        raise WeightsError(f"{path}: a YOLOv5 detector head with {nc} classes, but its first layer is not a Focus or "
                           "Conv stem; not a YOLOv5 P6 detector kapao can start from")
    version = "v5.0" if kinds[0] == "Focus" else "v6.0+"
    return {"format": DETECTOR_FORMAT, "size": detector_size(sd, path), "version": version, "nc": nc,
            "layer_kinds": kinds, "schema": None, "epoch": None}


def layer_kinds(sd: Mapping[str, Tensor]) -> dict[int, str]:
    """Layer index -> kind (Focus, Conv, C3, BottleneckCSP, SPP, Detect) from the names of a state_dict.

    SPP and SPPF hold the same tensors (two 1x1 convolutions) and both read as SPP here.
    """
    keys: dict[int, set[str]] = {}
    for k in sd:
        m = _LAYER.match(k)
        if m:
            keys.setdefault(int(m.group(1)), set()).add(k[m.end():])
    kinds = {}
    for i, rest in keys.items():
        if "anchors" in rest:
            kinds[i] = "Detect"
        elif "conv.conv.weight" in rest:
            kinds[i] = "Focus"
        elif "cv4.conv.weight" in rest:
            kinds[i] = "BottleneckCSP"
        elif "cv3.conv.weight" in rest:
            kinds[i] = "C3"
        elif "cv1.conv.weight" in rest:
            kinds[i] = "SPP"
        elif "conv.weight" in rest:
            kinds[i] = "Conv"
        else:
            kinds[i] = "other"
    return kinds


def detector_size(sd: Mapping[str, Tensor], path: Path) -> str:
    """The P6 size (n/s/m/l/x) whose widths (the head's input channels) and depth (bottlenecks of layer 2)
    match the tensors; the same for v5.0 and v6.0+ files."""
    from kapao.models.network import HEAD_SOURCES, P6_LAYERS, SIZES  # heavy module; only when reading

    head = _head_index(sd)
    first = sd.get(f"model.{head}.m.0.weight")
    n2 = len({k.split(".")[3] for k in sd if k.startswith("model.2.m.")})
    base = P6_LAYERS[HEAD_SOURCES[0]].channels
    for name, s in SIZES.items():
        if first is not None and first.shape[1] == s.channels(base) and n2 == s.repeats(P6_LAYERS[2].repeats):
            return name
    raise WeightsError(f"{path}: a YOLOv5 detector whose layer widths/depths match no P6 size "
                       f"({', '.join(SIZES)}); kapao starts only from yolov5{{n,s,m,l,x}}6 detectors")


@dataclass(frozen=True)
class Transfer:
    """What :func:`detector_transfer` copied: ``transferred`` of the model's ``total`` state entries;
    ``skipped_layers``: layer indices whose kind differs between the file and the model."""

    transferred: int
    total: int
    skipped_layers: tuple[int, ...]


def detector_transfer(model: nn.Module, sd: Mapping[str, Tensor], info: Mapping[str, Any]) -> Transfer:
    """Copy into ``model`` every tensor of a detector's ``sd`` whose name and shape equal the model's and
    whose layer is of the same kind in both (see the module docstring); returns the counts."""
    own = model.state_dict()
    mine, theirs = layer_kinds(own), dict(info.get("layer_kinds") or layer_kinds(sd))
    same = {i for i, k in mine.items() if theirs.get(i) == k}
    matched = {}
    for k, v in sd.items():
        m = _LAYER.match(k)
        if m and int(m.group(1)) in same and k in own and v.shape == own[k].shape:
            matched[k] = v
    model.load_state_dict(matched, strict=False)
    skipped = tuple(sorted(i for i in mine if i not in same and i in theirs))
    return Transfer(len(matched), len(own), skipped)


def check_detector_size(info: Mapping[str, Any], size: str | None) -> None:
    """UsageError (exit 2) when ``--size`` asks for another size than the detector's: every layer's width
    differs, so nothing but a few counters would transfer."""
    if size is not None and size != info["size"]:
        raise UsageError(f"--weights {info.get('path')} is the YOLOv5-{info['size']}6 detector, which cannot start "
                         f"kapao-{size} (other layer widths): use --weights yolov5{size}6, or --size {info['size']}")


def describe_transfer(info: Mapping[str, Any], t: Transfer) -> str:
    """What the transfer log line adds: the file's kind and, for v6.0+ files, the layers left fresh."""
    text = f" (a YOLOv5 {info.get('version')} P6 detector, {info.get('nc')} classes; the head's output convolutions"
    if t.skipped_layers:
        kinds = info.get("layer_kinds") or {}
        text += " and its layers of another kind, " + ", ".join(f"{i} ({kinds.get(i)})" for i in t.skipped_layers) + ","
    return text + " start fresh)"
