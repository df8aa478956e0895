"""Exported models made once on first use and cached: what the fast CPU backends run.

A cached file is an ordinary kapao ONNX file (:mod:`kapao.export` describes the format), fp32 or
int8 (:mod:`kapao.backends.int8`), either dynamic (any batch, height, width) or fixed to one input shape.
Its key -- the weights' content (a hash of the state dict, schema and size, so a retrained
``best.pt`` at the same path gets a new file), the input shape, the int8 calibration and quantisation recipe, the kapao
ONNX format and the versions of kapao, torch, onnx and onnxruntime -- is hashed into the file name
and stored in the file's metadata (``cache_key``). A file whose stored key differs, or which does
not parse (truncated, corrupt), is rebuilt. Files are written with :func:`kapao.runtime.atomic_write`:
processes that build the same file at once each write a complete file and the last rename wins, so a
reader never sees a partial one.

Folder: ``$KAPAO_CACHE_DIR`` if set, else ``exported/`` in the weights cache folder
(:func:`kapao.weights.registry.weights_dir`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from importlib import metadata
from pathlib import Path
from typing import cast

import torch
from torch import nn

from kapao.backends.int8 import Int8Calibration, quantize_int8, recipe_digest
from kapao.backends.onnx_graph import DEFAULT_OPSET, export_metadata, head_scope, inference_copy, set_metadata, trace
from kapao.backends.runtimes import ONNX_FORMAT_VERSION, require
from kapao.cfg.schema import KeypointSchema
from kapao.errors import WeightsError
from kapao.runtime import atomic_write, cpu_flags, os_error_reason
from kapao.version import __version__
from kapao.weights.registry import weights_dir

LOGGER = logging.getLogger(__name__)

CACHE_ENV = "KAPAO_CACHE_DIR"  # the same variable the label cache honours
CACHE_SUBDIR = "exported"
OPTIMIZED_SUBDIR = "ort-optimized"  # onnxruntime's optimised graphs of the cached files (optimized_path)
KEY_METADATA = "cache_key"
DYNAMIC_TRACE_SHAPE = (256, 256)  # example input of a dynamic export (any multiple of 64 traces the same graph)
KEY_PACKAGES = ("torch", "onnx", "onnxruntime")  # their versions change the file (exporter, quantiser)


def cache_dir() -> Path:
    """Where exported models are cached: $KAPAO_CACHE_DIR, else ``<weights cache folder>/exported``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else weights_dir() / CACHE_SUBDIR


def weights_digest(model: nn.Module) -> str:
    """sha256 of a KapaoModel's weights: every state-dict entry (name, dtype, shape, bytes), its size and schema."""
    h = hashlib.sha256(f"{getattr(model, 'size', '?')}|{json.dumps(cast(KeypointSchema, model.schema).to_dict())}".encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "-"


def cache_key(digest: str, shape: tuple[int, int] | None, calib: Int8Calibration | None = None) -> str:
    """The full key (JSON) of an exported model: weights digest, shape (None: dynamic), int8 calibration, versions."""
    return json.dumps({"weights": digest, "shape": list(shape) if shape else "dynamic",
                       "int8": calib.digest if calib else None,
                       "int8_recipe": recipe_digest() if calib else None, "format": ONNX_FORMAT_VERSION,
                       "opset": DEFAULT_OPSET, "kapao": __version__,
                       **{p: _version(p) for p in KEY_PACKAGES}}, sort_keys=True)


def cache_path(stem: str, shape: tuple[int, int] | None, calib: Int8Calibration | None, key: str) -> Path:
    """``<cache_dir>/<stem>-<dynamic|HxW>[-int8]-<hash of key>.onnx``."""
    kind = "dynamic" if shape is None else f"{shape[0]}x{shape[1]}"
    tag = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / f"{stem}-{kind}{'-int8' if calib else ''}-{tag}.onnx"


def optimized_path(path: Path) -> Path:
    """Where onnxruntime's optimised graph of the cached file `path` is kept: in ``ort-optimized/`` beside it,
    named by a hash of the file (size, modification time), the onnxruntime version and the CPU flags -- the
    optimised graph is specific to the machine -- so a rebuilt file, another onnxruntime or another CPU
    gets its own."""
    st = path.stat()
    tag = hashlib.sha256(f"{st.st_size}|{st.st_mtime_ns}|{_version('onnxruntime')}|{sorted(cpu_flags())}"
                         .encode()).hexdigest()[:12]
    return path.parent / OPTIMIZED_SUBDIR / f"{path.stem}-{tag}.onnx"


MODEL_METADATA_FIELD = 14  # ModelProto.metadata_props (onnx.proto), repeated StringStringEntryProto {1: key, 2: value}


def stored_key(path: Path) -> str | None:
    """The ``cache_key`` stored in a cached file; None when it is missing or the file's fields do not parse
    (truncated). Read by walking the protobuf fields of the file: importing the onnx package would cost
    most of a warm start (it loads ml_dtypes)."""
    # metadata_props is the last field serialized: a truncated file has lost it, or ends inside a field
    try:
        for field, value in _fields(path.read_bytes()):
            if field == MODEL_METADATA_FIELD and isinstance(value, bytes):
                entry = {k: v for k, v in _fields(value) if isinstance(v, bytes)}
                if entry.get(1) == KEY_METADATA.encode():
                    return entry.get(2, b"").decode()
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return None


def _fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """The (field number, value) pairs of one serialized protobuf message: varints as ints, length-delimited
    fields as bytes (fixed 32/64-bit ones as their bytes). ValueError when the bytes end inside a field."""
    out: list[tuple[int, int | bytes]] = []
    i, n = 0, len(data)
    while i < n:
        tag, i = _varint(data, i)
        wire = tag & 7
        if wire == 0:
            value, i = _varint(data, i)
            out.append((tag >> 3, value))
            continue
        size = {1: 8, 5: 4}.get(wire)
        if size is None:
            if wire != 2:
                raise ValueError(f"protobuf wire type {wire}")
            size, i = _varint(data, i)
        if i + size > n:
            raise ValueError("truncated protobuf field")
        out.append((tag >> 3, data[i:i + size]))
        i += size
    return out


def _varint(data: bytes, i: int) -> tuple[int, int]:
    """The protobuf varint at data[i:], and the index after it; ValueError when the bytes end first."""
    value = shift = 0
    while i < len(data):
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7
    raise ValueError("truncated protobuf varint")


def cached_onnx(model: nn.Module, stem: str, backend: str, shape: tuple[int, int] | None = None,
                calib: Int8Calibration | None = None) -> Path:
    """The cached ONNX file of `model` (a KapaoModel) for `shape` (None: dynamic) and `calib` (int8),
    exported now -- with a one-line notice naming `stem`, `backend` and the path -- when missing,
    stale or corrupt."""
    key = cache_key(weights_digest(model), shape, calib)
    path = cache_path(stem, shape, calib, key)
    if path.is_file():
        if stored_key(path) == key:
            return path
        LOGGER.info("%s is stale or damaged; exporting it again", path)
    how = f"int8, calibrated on {len(calib.images)} images: about a minute" if calib else "a few seconds"
    LOGGER.info("exporting %s to %s once (%s); cached at %s", stem, backend, how, path)
    t0 = time.perf_counter()
    data = build_onnx(model, stem, shape, calib, key)
    try:
        with atomic_write(path) as f:
            f.write(data)
    except OSError as e:
        raise WeightsError(f"cannot write the exported-model cache {path}: {os_error_reason(e, path)}; set "
                           f"{CACHE_ENV} to a writable folder, or use --backend torch") from None
    LOGGER.debug("exported %s in %.1f s", path, time.perf_counter() - t0)
    return path


def build_onnx(model: nn.Module, source: str, shape: tuple[int, int] | None, calib: Int8Calibration | None,
               key: str) -> bytes:
    """The serialized kapao ONNX graph of `model` (fp32, or int8 with `calib`), metadata with ``cache_key``."""
    onnx = require("onnx", "the exported-model cache")
    wrapper = inference_copy(model, torch.device("cpu"))
    h, w = shape or DYNAMIC_TRACE_SHAPE
    data = trace(wrapper, torch.zeros(1, 3, h, w), DEFAULT_OPSET, dynamic=shape is None)
    proto = onnx.load_from_string(data)
    set_metadata(proto, export_metadata(model, (h, w), dynamic=shape is None, half=False, batch=1,
                                        opset=DEFAULT_OPSET, source=source))
    if calib is not None:
        proto = onnx.load_from_string(quantize_int8(proto.SerializeToString(), calib, head_scope(model), shape))
    set_metadata(proto, {KEY_METADATA: key})
    return proto.SerializeToString()
