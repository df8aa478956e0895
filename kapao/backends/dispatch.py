"""Choosing how a network runs: torch (NCHW or channels_last), onnxruntime or OpenVINO, fp32 or int8.

``--backend auto`` (the default of predict and val) keeps torch on a GPU, for in-memory models and
where the runtime is not installed; on the CPU it runs weights files through
:data:`DEFAULT_CPU_BACKEND`, the fastest measured on the reference CPU
(``scripts/benchmark_backends.py``), from an ONNX file exported once and cached
(:mod:`kapao.backends.cache`). Every backend gives the same poses within fp32 rounding; int8 (a
statically quantised model, :mod:`kapao.backends.int8`) is faster and slightly less accurate.

Backends of exported models are either one dynamic-shape model (:data:`DEFAULT_SHAPES` ``"dynamic"``)
or a small cache of fixed-shape models, one per input shape seen (``"fixed"``: letterboxed video
frames all share one shape), :class:`ShapeCacheBackend`.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from kapao.backends.cache import cached_onnx
from kapao.backends.int8 import Int8Calibration
from kapao.backends.runtimes import (
    Backend,
    FixedShapeRunner,
    TorchBackend,
    is_exported_file,
    is_onnx,
    load_backend,
    read_metadata,
)
from kapao.errors import ConfigError, WeightsError
from kapao.runtime import cpu_count, select_device
from kapao.weights.loader import load_model

LOGGER = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "torch-cl", "onnxruntime", "openvino")  # torch-cl: torch with channels_last
# The backend `auto` runs weights files with on the CPU, measured with scripts/benchmark.py (kapao-s,
# 2-core AMD EPYC, 2 threads, one run, forward median of 5; 2026-11-28): at 1280 onnxruntime dynamic
# 457 ms (90 GFLOP/s), OpenVINO fixed 456 / dynamic 479, torch channels_last 928, torch NCHW 1089; at 640
# onnxruntime dynamic 104 ms, OpenVINO fixed 114 / dynamic 126, torch NCHW 193. End-to-end on the test
# video onnxruntime dynamic was the fastest at 1280 (2.11 fps vs 1.05 torch) and within 10 % of the best
# at 640; it also needs no extra package.
DEFAULT_CPU_BACKEND = "onnxruntime"
INT8_BACKEND = "onnxruntime"  # the one runtime of int8 models
# One dynamic-shape model ("dynamic") or one fixed-shape model per input shape ("fixed"): dynamic measured
# as fast as the fixed-shape cache in the forward pass (457 vs 460 ms at 1280, 104 vs 107 at 640).
DEFAULT_SHAPES = "dynamic"
SHAPE_POLICIES = ("dynamic", "fixed")
MAX_CACHED_SHAPES = 4  # fixed-shape models kept open (TTA uses 3 shapes, a video 1)
OPENVINO_HINT = "pip install openvino"


RUNTIME_PACKAGES = {"onnxruntime": ("onnx", "onnxruntime"), "openvino": ("onnx", "onnxruntime", "openvino")}


def installed(backend: str) -> bool:
    """Whether the packages `backend` needs are importable (`auto` falls back to torch without them;
    exporting the cached file needs onnx, and onnxruntime's check of it)."""
    return all(importlib.util.find_spec(p) is not None for p in RUNTIME_PACKAGES.get(backend, ()))


def choose_backend(backend: str, device: torch.device, weights: Any, int8: bool = False) -> str:
    """The concrete backend for ``--backend`` (``auto`` resolved as the module docstring says)."""
    if backend not in BACKENDS:
        raise ConfigError(f"--backend {backend}: choose one of {', '.join(BACKENDS)}")
    on_cpu = device.type == "cpu"
    if backend == "auto":
        if is_exported_file(weights):
            return "onnxruntime"  # an exported file: the runtime FILE_BACKENDS gives it
        if int8:
            return INT8_BACKEND
        if not on_cpu or isinstance(weights, nn.Module):
            return "torch"
        return next((b for b in (DEFAULT_CPU_BACKEND, "onnxruntime") if installed(b)), "torch")
    if backend == "openvino" and not on_cpu:
        raise ConfigError(f"--backend openvino runs on the CPU; use --device cpu (or --backend torch on {device})")
    if backend != "onnxruntime" and int8:
        # OpenVINO runs the onnxruntime QDQ model with coordinates off by pixels (its int8 path wants NNCF)
        raise ConfigError(f"--int8 runs on onnxruntime; use --backend onnxruntime or auto (not {backend})")
    if backend.startswith("torch") and is_exported_file(weights):
        raise ConfigError(f"--backend {backend} needs .pt weights; {weights} is an exported model "
                          "(use --backend onnxruntime or openvino)")
    return backend


def select_backend(weights: str | os.PathLike | nn.Module, device: str | torch.device | None = None,
                   half: bool = False, backend: str = "auto", *, int8: Int8Calibration | None = None,
                   shapes: str = DEFAULT_SHAPES, fold_bn: bool = True) -> Backend:
    """The backend for `weights` (a KapaoModel, checkpoint, name or exported .onnx file) and ``--backend``.

    ``int8``: run a statically quantised model calibrated on these images (onnxruntime);
    ``shapes``: ``dynamic`` or ``fixed`` (see the module docstring); ``half``: fp16, torch on CUDA only.
    """
    dev = device if isinstance(device, torch.device) else select_device(device)
    if shapes not in SHAPE_POLICIES:
        raise ConfigError(f"shapes={shapes!r}: choose one of {', '.join(SHAPE_POLICIES)}")
    if half and dev.type != "cuda":
        raise ConfigError("--half needs a CUDA device (fp16 is not faster on CPU); drop --half or use --device 0")
    name = choose_backend(backend, dev, weights, int8 is not None)
    if name.startswith("torch"):
        if isinstance(weights, nn.Module):
            return TorchBackend(weights, dev, half, fold_bn, channels_last=name == "torch-cl")
        return TorchBackend.from_weights(weights, dev, half, fold_bn, channels_last=name == "torch-cl")
    if is_exported_file(weights):
        if int8 is not None:
            raise ConfigError(f"--int8: {weights} is already exported; quantise the .pt weights "
                              "(kapao export --int8) or drop --int8")
        return OpenVinoBackend(weights) if name == "openvino" and is_onnx(weights) else load_backend(weights, dev, half)
    if half:
        raise ConfigError(f"--half runs torch (or an fp16 .onnx export) on CUDA; use --backend torch, not {name}")
    model, info = (weights, {}) if isinstance(weights, nn.Module) else load_model(weights, device="cpu")
    stem = info.get("name") or (Path(info["path"]).stem if info.get("path") else f"kapao_{model.size}")

    def make(shape: tuple[int, int] | None) -> Backend:
        path = cached_onnx(model, stem, name, shape, int8)
        made = OpenVinoBackend(path) if name == "openvino" else load_backend(path, dev)
        made.info = {**info, "backend": name, "exported": str(path), "int8": int8 is not None}
        return made

    if shapes == "fixed":
        return ShapeCacheBackend(make, model.schema, {**info, "backend": name, "int8": int8 is not None}, dev)
    return make(None)


class ShapeCacheBackend:
    """Fixed-shape exported models, one per input (h, w) seen, made on first sight by ``make`` and kept
    for the :data:`MAX_CACHED_SHAPES` most recently used shapes. Any multiple of 64 is accepted."""

    def __init__(self, make: Callable[[tuple[int, int]], Backend], schema: Any, info: Mapping[str, Any],
                 device: torch.device, max_shapes: int = MAX_CACHED_SHAPES) -> None:
        self.make, self.max_shapes = make, max_shapes
        self.backends: OrderedDict[tuple[int, int], Backend] = OrderedDict()
        self.schema, self.device, self.half = schema, device, False
        self.fixed_shape: tuple[int, int] | None = None
        self.info: dict[str, Any] = dict(info)

    def __repr__(self) -> str:
        return f"ShapeCacheBackend({self.info.get('backend')}, shapes {list(self.backends)})"

    def __call__(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, N, no) from the model fixed to (H, W)."""
        shape = (int(x.shape[-2]), int(x.shape[-1]))
        backend = self.backends.pop(shape, None) or self.make(shape)
        self.backends[shape] = backend
        while len(self.backends) > self.max_shapes:
            self.backends.popitem(last=False)
        return backend(x)


class OpenVinoBackend(FixedShapeRunner):
    """An exported kapao ONNX file (fp32 or int8 QDQ) compiled by OpenVINO for the CPU.

    fp32 stays fp32 (``INFERENCE_PRECISION_HINT`` f32: no silent bf16 on CPUs that have it), latency
    hint, ``threads`` inference threads (default: physical cores). Attributes as :class:`Backend`, plus
    ``meta`` (the file's :class:`kapao.backends.runtimes.OnnxInfo`) and ``batch``.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        try:
            import openvino as ov  # optional, heavy: only for --backend openvino
        except ImportError:
            raise WeightsError(f"--backend openvino needs the 'openvino' package: {OPENVINO_HINT}") from None
        self.meta = read_metadata(path)  # checks the file and its kapao metadata
        core = ov.Core()
        try:
            model = core.read_model(str(path))
            self.compiled = core.compile_model(model, "CPU", {
                "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32",
                "INFERENCE_NUM_THREADS": int(threads or cpu_count(physical=True))})
        except Exception as e:  # noqa: BLE001 - OpenVINO raises RuntimeError with long texts
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise WeightsError(f"OpenVINO cannot compile {path} ({first}); use --backend onnxruntime") from None
        self.request = self.compiled.create_infer_request()
        dims = self.compiled.input(0).get_partial_shape()
        static = [d.get_length() if d.is_static else None for d in dims]
        self.batch: int | None = static[0]
        self.fixed_shape = (static[2], static[3]) if None not in static[2:] else None
        self.schema, self.device, self.half = self.meta.schema, torch.device("cpu"), False
        self.info: dict[str, Any] = {"path": str(path), "format": "onnx", "runtime": "openvino", **self.meta.raw}

    def __repr__(self) -> str:
        shape = "dynamic" if self.fixed_shape is None else f"{self.fixed_shape[0]}x{self.fixed_shape[1]}"
        return f"OpenVinoBackend(kapao-{self.meta.size}, {shape}, K={self.schema.num_keypoints})"

    def _run(self, x: Tensor) -> Tensor:
        arr = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        self.request.infer({0: arr})
        return torch.from_numpy(np.array(self.request.get_output_tensor(0).data, copy=True)).float()
