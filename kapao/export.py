"""ONNX export of a KAPAO model: writes the file, checks it against torch (:mod:`kapao.backends.runtimes` runs it).

Export (:func:`export_onnx`) traces the Conv+BN-folded network behind :class:`DecodedOutput`, the only
export-specific piece: it returns the decoded tensor of the eval forward and drops the raw list. The
tracing and the metadata live in :mod:`kapao.backends.onnx_graph` (the fast CPU backends build cached graphs
with it too); ``--int8`` quantises the graph with :mod:`kapao.backends.int8`.

ONNX graph
    input  ``images``: (B, 3, H, W) float32 (float16 with ``half``) RGB in [0, 1], letterboxed; H, W
           multiples of 64. Static exports fix B, H, W; ``dynamic`` makes all three free.
    output ``output``: (B, N, no) decoded predictions in network-input pixels, channels as
           :class:`kapao.cfg.schema.HeadLayout` (box cx, cy, w, h | objectness | 1 + K class
           probabilities | 2K keypoint x, y) -- exactly what ``KapaoModel.eval()(x)[0]`` returns.

The file carries its own description in ``metadata_props`` (all values strings, JSON where
structured): ``format`` (kapao-onnx), ``format_version``, ``kapao_version``, ``size``, ``imgsz``
[h, w], ``batch`` (int, or null when dynamic), ``stride`` (64), ``strides``, ``dynamic``, ``half``,
``opset``, ``num_keypoints``, ``schema`` (:meth:`KeypointSchema.to_dict`: kpt_names, flip_idx, sigmas,
skeleton, kp_bbox), ``names`` (class names), ``source`` (the weights it came from) and ``check``
(the export's own comparison with torch, see :func:`compare_outputs`).
:class:`kapao.backends.runtimes.OnnxBackend` rebuilds the schema from it, so no checkpoint is needed at runtime::

    backend = OnnxBackend("kapao_s_coco.onnx")
    predictor = Predictor.from_backend(backend)
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, cast

import numpy as np
import torch
from torch import Tensor, nn

from kapao.backends.int8 import INT8_METADATA, Int8Calibration, quantize_int8
from kapao.backends.onnx_graph import (
    DEFAULT_OPSET,
    MIN_OPSET,
    export_metadata,
    head_scope,
    inference_copy,
)
from kapao.backends.onnx_graph import set_metadata as _set_metadata
from kapao.backends.onnx_graph import trace as _trace
from kapao.backends.precision import WHY_EXPORT, check_precision, precision_of
from kapao.backends.runtimes import OnnxBackend, require
from kapao.cfg.schema import MAX_STRIDE, HeadLayout, KeypointSchema, check_imgsz
from kapao.data.letterbox import letterbox
from kapao.data.sources import default_source, load_image
from kapao.errors import ConfigError, UsageError, WeightsError
from kapao.runtime import atomic_write, check_writable, os_error_reason, select_device
from kapao.weights.loader import load_model

if TYPE_CHECKING:
    from kapao.models.network import KapaoModel

LOGGER = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Export


def image_size(imgsz: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """(h, w) from an int or a pair; each a positive multiple of 64."""
    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else tuple(int(v) for v in imgsz)
    try:
        return check_imgsz(h), check_imgsz(w)
    except ConfigError:
        raise ConfigError(f"--imgsz {imgsz}: height and width must be positive multiples of {MAX_STRIDE}") from None


def _resolve_model(weights_or_model: Any) -> tuple[KapaoModel, Path | None, str]:
    """(model on CPU, weights file or None, source description)."""
    if isinstance(weights_or_model, nn.Module):
        model = weights_or_model
        if not isinstance(getattr(model, "schema", None), KeypointSchema) or not hasattr(model, "size"):
            raise ConfigError("export needs a kapao model (with .schema and .size) or a weights file/name")
        return cast("KapaoModel", model), None, f"kapao-{model.size} (in memory)"
    model, info = load_model(weights_or_model, device="cpu")
    path = Path(info["path"])
    return model, path, info.get("name") or path.name


def _output_path(path: str | os.PathLike | None, weights: Path | None, size: str, tag: str = "") -> Path:
    name = f"{weights.stem if weights is not None else f'kapao_{size}'}{tag}.onnx"
    if path is None:
        return weights.with_name(name) if weights is not None else Path(name)
    out = Path(path)
    return out / name if out.is_dir() else out


def _onnxslim() -> Any:
    try:
        import onnxslim  # optional: only for --simplify
    except ImportError:
        raise ConfigError("--simplify needs the 'onnxslim' package: pip install onnxslim "
                          "(or export without --simplify)") from None
    return onnxslim


def check_image_tensor(image: str | os.PathLike | np.ndarray | None, imgsz: tuple[int, int]) -> Tensor:
    """(1, 3, h, w) float RGB in [0, 1]: a BGR image (path or array; default ultralytics' bus.jpg)
    letterboxed to exactly ``imgsz`` -- the input the export compares torch and onnxruntime on."""
    if image is None:
        image = default_source() / "bus.jpg"
    im = load_image(str(image)) if not isinstance(image, np.ndarray) else image
    out, _, _ = letterbox(im, imgsz, auto=False)
    arr = np.ascontiguousarray(out[..., ::-1].transpose(2, 0, 1))[None]
    return torch.from_numpy(arr).float() / 255.0


def compare_outputs(reference: Tensor, other: Tensor, layout: HeadLayout) -> dict[str, float]:
    """Max absolute differences of two decoded outputs (B, N, no): ``max_abs_diff`` over all channels,
    ``coords`` (box + keypoints, network-input pixels) and ``scores`` (objectness + class probabilities)."""
    if reference.shape != other.shape:
        raise ValueError(f"outputs differ in shape: {tuple(reference.shape)} vs {tuple(other.shape)}")
    d = (reference.detach().float() - other.detach().float().to(reference.device)).abs()
    coords = torch.cat((d[..., layout.box], d[..., layout.kpt]), -1)
    scores = d[..., layout.obj:layout.cls.stop]
    return {"max_abs_diff": float(d.max()), "coords": float(coords.max()), "scores": float(scores.max())}


def export_onnx(weights_or_model: str | os.PathLike | nn.Module, path: str | os.PathLike | None = None,
                imgsz: int | tuple[int, int] = 640, *, dynamic: bool = False, half: bool = False,
                simplify: bool = False, opset: int = DEFAULT_OPSET, batch: int = 1,
                check_image: str | os.PathLike | np.ndarray | None = None, check: bool = True,
                device: str | torch.device | None = None, exist_ok: bool = False, int8: Int8Calibration | None = None) -> Path:
    """Export a KAPAO model (weights spec as for ``load_model``, or a KapaoModel) to ONNX.

    The model is deep-copied, Conv+BN folded and put in eval mode (the caller's model is untouched);
    the graph outputs only the decoded (B, N, no) tensor (see the module docstring). ``imgsz`` (int
    or (h, w), multiples of 64) and ``batch`` fix the input shape unless ``dynamic`` (free batch,
    height and width). ``half`` exports fp16 and needs a CUDA device (``device``, default: CPU, or the
    first GPU with ``half``). ``simplify`` runs onnxslim. ``int8`` quantises the graph statically
    (:func:`kapao.backends.int8.quantize_int8`, calibrated on its images; CPU, not with ``half``). The file
    is written to ``path`` (a file, or a folder), by default next to the weights as ``<weights
    stem>.onnx`` (``<stem>-int8.onnx`` with int8), atomically; an existing file is only replaced with
    ``exist_ok`` (else UsageError, exit 2, before the slow export).

    With ``check`` the exported file is run with onnxruntime on ``check_image`` (default: bus.jpg from
    ultralytics) letterboxed to ``imgsz`` and compared with the torch model; the differences (see
    :func:`compare_outputs`) are stored in the metadata key ``check`` (read them with
    :func:`kapao.backends.runtimes.read_metadata`, print them with :func:`describe_check`) and logged at debug level.
    Returns the path of the written file.
    """
    onnx = require("onnx", "ONNX export")
    h, w = image_size(imgsz)
    if not MIN_OPSET <= opset:
        raise ConfigError(f"--opset {opset}: kapao exports opset {MIN_OPSET} or newer (default {DEFAULT_OPSET})")
    if batch < 1:
        raise ConfigError(f"--batch {batch}: must be at least 1")
    precision = precision_of(half, int8 is not None)
    dev = select_device(device) if device is not None or half else torch.device("cpu")
    check_precision(precision, dev, why=WHY_EXPORT)
    slim = _onnxslim() if simplify else None

    model, weights, source = _resolve_model(weights_or_model)
    out = _output_path(path, weights, model.size, "-int8" if int8 is not None else "")
    if out.exists() and not exist_ok:
        raise UsageError(f"{out} already exists; add --exist-ok to overwrite it, or choose another file with -o")
    _write_output(out, None)  # an unwritable output fails now, not after the slow export
    wrapper = inference_copy(model, dev, half)
    dtype = torch.float16 if half else torch.float32
    example = torch.zeros(batch, 3, h, w, device=dev, dtype=dtype)
    proto = onnx.load_from_string(_trace(wrapper, example, opset, dynamic))
    if slim is not None:
        proto = slim.slim(proto)
    meta = export_metadata(model, (h, w), dynamic=dynamic, half=half, batch=batch, opset=opset, source=source)
    _set_metadata(proto, meta)
    data = proto.SerializeToString()
    if int8 is not None:
        data = quantize_int8(data, int8, head_scope(model), None if dynamic else (h, w))
        proto = onnx.load_from_string(data)
        meta[INT8_METADATA] = next(p.value for p in proto.metadata_props if p.key == INT8_METADATA)
    if check:
        meta["check"] = json.dumps(_check(data, wrapper, check_image, (h, w), batch, dev, dtype, model.layout))
        _set_metadata(proto, {"check": meta["check"]})
        data = proto.SerializeToString()
    _write_output(out, data)
    LOGGER.debug("exported %s (%.1f MB); %s", out, len(data) / 1e6, describe_check(meta))
    return out


def _check(data: bytes, wrapper: nn.Module, image: Any, imgsz: tuple[int, int], batch: int, dev: torch.device,
           dtype: torch.dtype, layout: HeadLayout) -> dict[str, Any]:
    """Run the serialized model with onnxruntime and torch on one letterboxed image; their differences."""
    x = check_image_tensor(image, imgsz).repeat(batch, 1, 1, 1).to(dev, dtype)
    with torch.no_grad():
        ref = wrapper(x).float().cpu()
    name = image if isinstance(image, (str, os.PathLike)) else ("bus.jpg" if image is None else "array")
    try:
        backend = OnnxBackend(data, device=dev)
    except WeightsError as e:  # e.g. an fp16 file with a CPU-only onnxruntime
        LOGGER.warning("export check skipped: %s", e)
        return {"skipped": str(e)}
    got = backend(x).float().cpu()
    return {"image": Path(str(name)).name, "shape": list(x.shape), "provider": backend.provider,
            **compare_outputs(ref, got, layout)}


def describe_check(meta: Mapping[str, Any]) -> str:
    """One line about the export check stored in metadata (raw strings or :func:`kapao.backends.runtimes.read_metadata`)."""
    check = meta.get("check")
    if isinstance(check, str):
        check = json.loads(check)
    if not check:
        return "not checked against torch"
    if "skipped" in check:
        return f"check against torch skipped ({check['skipped']})"
    return (f"onnxruntime vs torch on {check['image']} {check['shape'][2]}x{check['shape'][3]}: max abs diff "
            f"{check['max_abs_diff']:.2e} (coordinates {check['coords']:.2e} px, scores {check['scores']:.2e})")


def _write_output(path: Path, data: bytes | None) -> None:
    """Write `data` to `path` atomically; `data` None only checks that it could (before the slow export)."""
    try:
        if data is None:
            check_writable(path)
            return
        with atomic_write(path) as f:
            f.write(data)
    except OSError as e:
        raise WeightsError(f"cannot write {path}: {os_error_reason(e, path)}; choose a writable folder") from None
