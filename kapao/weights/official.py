"""Official KAPAO checkpoints, read without running their code.

Official files (``kapao_s_coco.pt`` …) are dicts whose ``model`` entry is a pickled YOLOv5
``models.yolo.Model`` (FP16). :func:`load_official_checkpoint` reads them through a restricted
unpickler that builds inert stand-ins instead of those classes (see its docstring);
:func:`official_to_state_dict` turns the stand-ins into our network's state_dict and metadata.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor

from kapao.cfg.schema import STRIDES, KeypointSchema
from kapao.errors import WeightsError
from kapao.weights.checkpoint import _corrupt, build_and_load, infer_size, save_checkpoint
from kapao.weights.registry import PathLike, check_file
from kapao.weights.unpickle import StandIn, _Refused, restricted_pickle


def load_official_checkpoint(path: PathLike) -> dict[str, Any]:
    """Read an official KAPAO/YOLOv5 checkpoint without executing pickled code.

    Why a restricted ``pickle_module`` for ``torch.load`` rather than torch's weights-only loader
    with allow-listed stand-ins: (1) the allow-list, the stand-in mapping and the refusal message are
    ours and do not depend on how a torch version words its errors; (2) stand-ins must be registered
    under names they do not have (``models.yolo.Model``), which the weights-only loader supports only
    through process-global ``safe_globals`` state (not thread-safe) and only in recent torch versions;
    (3) a standard ``pickle.Unpickler`` can reach callables only through ``find_class`` (GLOBAL,
    STACK_GLOBAL, INST and the copyreg extension opcodes all resolve through it) and torch's
    ``persistent_load`` (storages only), so restricting ``find_class`` to inert stand-ins and tensor
    rebuild functions closes every route to running code. ``weights_only=False`` is passed only
    because torch refuses a custom ``pickle_module`` otherwise; the restriction is ours.

    Returns the top-level dict with stand-ins in place of modules (``ckpt['model'].state['yaml']`` …).
    A refused global raises WeightsError("… refused: the file tries to run code (module.name) …").
    """
    path = Path(path)
    check_file(path)
    try:
        obj = torch.load(path, map_location="cpu", pickle_module=restricted_pickle, weights_only=False)
    except _Refused as e:
        raise WeightsError(f"{path}: refused: the file tries to run code ({e.name}) or build objects that "
                           "official KAPAO checkpoints do not contain; nothing was executed — do not use this "
                           "file, get the weights from the official source") from None
    except RuntimeError as e:
        if "pickle_module" in str(e):  # TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 forbids custom unpicklers
            raise WeightsError(f"{path} is an official KAPAO checkpoint, which kapao reads with its own "
                               "restricted unpickler, but TORCH_FORCE_WEIGHTS_ONLY_LOAD is set; unset it, or "
                               "convert the file once with kapao.weights.official.convert_official()") from None
        raise _corrupt(path, e) from None
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - any failure to unpickle means a damaged file
        raise _corrupt(path, e) from None
    if not isinstance(obj, Mapping) or not isinstance(obj.get("ema") or obj.get("model"), StandIn):
        raise WeightsError(f"{path} is not an official KAPAO checkpoint (no pickled 'model' entry) and not a "
                           "kapao checkpoint or state_dict")
    return dict(obj)


def module_state_dict(node: StandIn, prefix: str, out: dict[str, Tensor], path: Path) -> None:
    """nn.Module.state_dict() over recorded stand-ins: parameters, persistent buffers, children."""
    non_persistent = node.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        for name, t in (node.get(group) or {}).items():
            if t is None or (group == "_buffers" and name in non_persistent):
                continue
            if not isinstance(t, Tensor):
                raise WeightsError(f"{path}: {prefix}{name} is a {type(t).__name__}, not a tensor; the file "
                                   "is not a valid KAPAO checkpoint")
            out[prefix + name] = t
    for name, child in node.children.items():
        if child is None:
            continue
        if not isinstance(child, StandIn):
            raise WeightsError(f"{path}: submodule {prefix}{name} is a {type(child).__name__}; the file is not a "
                               "valid KAPAO checkpoint")
        module_state_dict(child, f"{prefix}{name}.", out, path)


def _iter_standins(node: StandIn, prefix: str = "") -> Iterator[tuple[str, StandIn]]:
    yield prefix.rstrip("."), node
    for name, child in node.children.items():
        if isinstance(child, StandIn):
            yield from _iter_standins(child, f"{prefix}{name}.")


def _to_float(v: Any) -> Any:
    if isinstance(v, Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if type(v).__module__ == "numpy":
        return v.item() if getattr(v, "size", 1) == 1 else v.tolist()
    return v


def official_to_state_dict(ckpt: Mapping[str, Any],
                           path: PathLike = "<checkpoint>") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Flatten an official checkpoint (from :func:`load_official_checkpoint`) into our network's terms.

    Returns (state_dict, meta): float32 tensors keyed like :class:`kapao.models.network.KapaoModel`
    (``model.0.conv.conv.weight`` …, ``model.33.anchors`` in grid units; ``anchor_grid`` dropped)
    and meta = {size, num_keypoints, keypoint_names (or None), anchors (nl, na, 2) pixels as lists,
    strides, bn_eps, epoch, best_fitness}. The EMA model is used when present (as YOLOv5 does).
    """
    path = Path(path)
    root = _model_node(ckpt, path)
    raw: dict[str, Tensor] = {}
    module_state_dict(root, "", raw, path)
    detect, head = detect_layer(root, path)
    num_keypoints = _num_keypoints(detect, raw.get(head + "m.0.weight"), path)
    anchors_px, strides = _anchors(detect, raw, head, path)
    state_dict = _to_float32(raw, drop=head + "anchor_grid")
    size = _model_size(root, state_dict, path)
    _check_activations(root, path)
    best = ckpt.get("best_fitness")
    meta = {
        "size": size,
        "num_keypoints": num_keypoints,
        "keypoint_names": _keypoint_names(root, num_keypoints),
        "anchors": anchors_px.tolist(),
        "strides": list(strides),
        "bn_eps": _bn_eps(root),
        "epoch": ckpt.get("epoch") if isinstance(ckpt.get("epoch"), int) else None,
        "best_fitness": _to_float(best) if best is not None else None,
    }
    return state_dict, meta


def _model_node(ckpt: Mapping[str, Any], path: Path) -> StandIn:
    """The pickled model: the EMA one when present (as YOLOv5 does), else ``model``."""
    root = ckpt.get("ema") if isinstance(ckpt.get("ema"), StandIn) else ckpt.get("model")
    if not isinstance(root, StandIn) or not isinstance(root.get("_modules"), Mapping):
        raise WeightsError(f"{path}: the 'model' entry is not a pickled YOLOv5 model")
    return root


def detect_layer(root: StandIn, path: Path) -> tuple[StandIn, str]:
    """The YOLOv5 Detect layer (the last one) and its state_dict prefix (``model.33.``)."""
    layers = root.children.get("model")
    detect = list(layers.children.values())[-1] if isinstance(layers, StandIn) and layers.children else None
    if not isinstance(layers, StandIn) or not isinstance(detect, StandIn) or not detect.qualname.endswith(".Detect"):
        raise WeightsError(f"{path}: no YOLOv5 Detect layer at the end of the model; not a KAPAO checkpoint")
    return detect, f"model.{len(layers.children) - 1}."


def _num_keypoints(detect: StandIn, out_weight: Tensor | None, path: Path) -> int:
    """K from the head, where ``nc`` (1 + K), ``no`` (6 + 3K) and the output conv must all agree."""
    no, nc = detect.get("no"), detect.get("nc")
    na = int(detect.get("na") or 3)
    candidates = [k for k in ((int(nc) - 1 if isinstance(nc, int) else None),
                              ((int(no) - 6) / 3 if isinstance(no, int) else None),
                              ((out_weight.shape[0] / na - 6) / 3 if out_weight is not None else None))
                  if k is not None]
    if not candidates or any(k != candidates[0] for k in candidates) or candidates[0] < 1 \
            or candidates[0] != int(candidates[0]):
        raise WeightsError(f"{path}: the head's class/output counts (nc={nc}, no={no}) do not describe KAPAO "
                           "keypoints (no = 6 + 3K); not a KAPAO checkpoint")
    return int(candidates[0])


def _anchors(detect: StandIn, raw: Mapping[str, Tensor], head: str, path: Path) -> tuple[Tensor, tuple[int, ...]]:
    """(anchors (nl, na, 2) in pixels, strides). Detect.anchors is in grid units (pixels / stride),
    anchor_grid (when stored) in pixels; both must agree."""
    anchors_grid = raw.get(head + "anchors")
    if anchors_grid is None:
        raise WeightsError(f"{path}: the Detect layer has no anchors buffer")
    stride_t = detect.get("stride")
    strides = tuple(int(s) for s in (stride_t.tolist() if isinstance(stride_t, Tensor) else STRIDES))
    if strides != tuple(STRIDES):
        raise WeightsError(f"{path}: the model's strides are {strides}, KAPAO P6 networks use {tuple(STRIDES)}")
    anchors_px = anchors_grid.float() * torch.tensor(strides, dtype=torch.float32).view(-1, 1, 1)
    grid_px = raw.get(head + "anchor_grid")
    if grid_px is not None and grid_px.numel() == anchors_px.numel():
        if not torch.allclose(grid_px.float().view_as(anchors_px), anchors_px, rtol=1e-2, atol=0.5):
            raise WeightsError(f"{path}: Detect.anchors x stride does not equal Detect.anchor_grid; the file is "
                               "inconsistent")
    return anchors_px, strides


def _to_float32(raw: Mapping[str, Tensor], *, drop: str) -> dict[str, Tensor]:
    """The official FP16 tensors as float32 (integer buffers copied), without the key ``drop``."""
    return {k: (v.detach().float().contiguous() if v.is_floating_point() else v.detach().clone())
            for k, v in raw.items() if k != drop}


def _model_size(root: StandIn, state_dict: Mapping[str, Tensor], path: Path) -> str:
    """The size (s/m/l …) from the yaml's depth/width multiples, checked against the tensor shapes."""
    from kapao.models.network import SIZES  # the network module is heavy; reading a file need not be

    yaml = root.get("yaml") if isinstance(root.get("yaml"), Mapping) else {}
    size = None
    if "depth_multiple" in yaml and "width_multiple" in yaml:
        gd, gw = float(yaml["depth_multiple"]), float(yaml["width_multiple"])
        size = next((n for n, s in SIZES.items() if math.isclose(s.depth, gd, abs_tol=0.006)
                     and math.isclose(s.width, gw, abs_tol=0.006)), None)
        if size is None:
            raise WeightsError(f"{path}: depth/width multiples {gd}/{gw} match no kapao size "
                               f"({', '.join(f'{n}={s.depth}/{s.width}' for n, s in SIZES.items())})")
    inferred = infer_size(state_dict)
    if size is None:
        size = inferred
    elif inferred is not None and inferred != size:
        raise WeightsError(f"{path}: yaml says size {size} but the tensors have the shapes of size {inferred}")
    if size is None:
        raise WeightsError(f"{path}: cannot tell the model size (s/m/l) from the checkpoint")
    return size


def _keypoint_names(root: StandIn, num_keypoints: int) -> list[str] | None:
    """Keypoint names from the class names (['person', kp1, ..., kpK]), None if they are not names."""
    names = root.get("names")
    if isinstance(names, Mapping):  # newer YOLOv5 stores {index: name}
        names = [names[i] for i in sorted(names)]
    if isinstance(names, (list, tuple)) and len(names) == num_keypoints + 1 \
            and not all(str(n).isdigit() for n in names):
        return [str(n) for n in names[1:]]
    return None


def _bn_eps(root: StandIn) -> dict[str, float]:
    """BatchNorm eps per module prefix (not part of the state_dict)."""
    return {p: float(n.get("eps")) for p, n in _iter_standins(root)
            if n.qualname.endswith("BatchNorm2d") and isinstance(n.get("eps"), float)}


def _check_activations(root: StandIn, path: Path) -> None:
    acts = {n.qualname.rsplit(".", 1)[-1] for p, n in _iter_standins(root) if p.endswith(".act")}
    if acts - {"SiLU"}:
        raise WeightsError(f"{path}: the model uses {', '.join(sorted(acts - {'SiLU'}))} activations; kapao "
                           "networks use SiLU (YOLOv5 v4.0+), so these weights cannot be used")


def read_official(path: Path, ckpt: Mapping[str, Any] | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(state_dict, info) of an official file: :func:`official_to_state_dict`'s meta plus format
    'official' and the keypoint schema (from the stored keypoint names when there are any).
    ``ckpt``: the file already read by :func:`load_official_checkpoint`."""
    state_dict, meta = official_to_state_dict(ckpt if ckpt is not None else load_official_checkpoint(path), path)
    return state_dict, {"format": "official", **meta,
                        "schema": KeypointSchema.infer(meta["num_keypoints"], meta["keypoint_names"])}


def convert_official(src: PathLike, dst: PathLike) -> Path:
    """Rewrite an official checkpoint as a kapao checkpoint (plain data, loadable weights-only)."""
    state_dict, info = read_official(Path(src))
    model = build_and_load(state_dict, info, Path(src), "cpu")
    extra = {"source": str(src), "epoch": info.get("epoch"), "best_fitness": info.get("best_fitness"),
             "converted_from": "official KAPAO checkpoint"}
    return save_checkpoint(dst, model, extra=extra)
