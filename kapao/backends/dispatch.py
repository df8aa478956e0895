"""Choosing how a network runs: one table of runtimes, one dispatcher, the runtime spec.

:data:`RUNTIMES` has one row per runtime -- torch (NCHW), torch-cl (channels_last), onnxruntime,
OpenVINO -- saying what it runs (KapaoModels and checkpoints, exported ``.onnx`` files), whether
``.pt`` weights go through the exported-model cache first (:mod:`kapao.backends.cache`), at which
precisions it runs them, on which devices, which packages it needs and how it is built. A new runtime
is one class with the attributes of :class:`kapao.backends.runtimes.Backend` and one new row.

:func:`load_backend` is the one dispatcher: ``--backend`` and a :class:`RuntimeSpec` in, a backend out.
``--backend auto`` (the default of predict and val) keeps torch on a GPU, for in-memory models and
where the runtime is not installed; an exported file gets the first row that runs its kind of file; on
the CPU, weights files run through :data:`DEFAULT_CPU_BACKEND`, the fastest measured on the reference
CPU (README, section "Backends"), from an ONNX file exported once and cached; ``--int8`` runs on
:data:`INT8_BACKEND`. Every backend gives the same poses within fp32 rounding; int8 (a statically
quantised model, :mod:`kapao.backends.int8`) is faster and slightly less accurate.

Backends of exported models are either one dynamic-shape model (:data:`DEFAULT_SHAPES` ``"dynamic"``)
or a small cache of fixed-shape models, one per input shape seen (``"fixed"``: letterboxed video
frames all share one shape), :class:`ShapeCacheBackend`.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from kapao.backends.cache import cache_dir, cached_onnx, optimized_path
from kapao.backends.int8 import Int8Calibration
from kapao.backends.precision import PrecisionError, check_precision, half_precision
from kapao.backends.runtimes import (
    Backend,
    BackendInfo,
    FixedShapeRunner,
    OnnxBackend,
    TorchBackend,
    onnx_info,
    read_metadata,
)
from kapao.errors import ConfigError, WeightsError
from kapao.runtime import cpu_count, select_device
from kapao.weights.loader import load_model

LOGGER = logging.getLogger(__name__)

AUTO = "auto"
# The runtime `auto` runs weights files with on the CPU: the fastest measured (README, section "Backends").
DEFAULT_CPU_BACKEND = "onnxruntime"
# One dynamic-shape model ("dynamic") or one fixed-shape model per input shape ("fixed"): dynamic measured
# as fast as the fixed-shape cache (README, section "Backends").
DEFAULT_SHAPES = "dynamic"
SHAPE_POLICIES = ("dynamic", "fixed")
MAX_CACHED_SHAPES = 4  # fixed-shape models kept open (TTA uses 3 shapes, a video 1)
OPENVINO_HINT = "pip install openvino"


@dataclass(frozen=True)
class RuntimeSpec:
    """Where and how a network is to run, as predict and val are asked: ``device`` (as for
    :func:`kapao.runtime.select_device`: None, ``cpu``, ``0``, a torch.device), ``half`` (fp16, CUDA
    only), ``backend`` (``auto`` or a row of :data:`RUNTIMES`) and ``int8`` (run a statically quantised
    model calibrated on these images; None: no int8)."""

    device: str | int | torch.device | None = None
    half: bool = False
    backend: str = AUTO
    int8: Int8Calibration | None = None

    @property
    def precision(self) -> str:
        """``int8`` with a calibration, else ``fp16`` with ``half``, else ``fp32``."""
        return "int8" if self.int8 is not None else "fp16" if self.half else "fp32"


@dataclass(frozen=True)
class Runtime:
    """One row of :data:`RUNTIMES`.

    ``files``: suffixes of exported files it runs as they are (empty: it runs KapaoModels, checkpoints and
    named weights); ``cached``: KapaoModels and ``.pt`` weights are exported once to an ONNX file in the
    exported-model cache, which it then runs; ``precisions``: what it runs such weights at (an exported
    file runs at its own precision); ``devices``: device types it runs on (empty: any);
    ``packages``: what must be importable for ``auto`` to choose it; ``build(path_or_weights, device,
    half, fold_bn)``: the backend (for a cached row, of the exported file).
    """

    name: str
    files: tuple[str, ...]
    cached: bool
    precisions: tuple[str, ...]
    devices: tuple[str, ...]
    packages: tuple[str, ...]
    build: Callable[..., Backend]

    def runs_file(self, weights: Any) -> bool:
        """`weights` is a path/name of an exported file this runtime runs as it is."""
        return isinstance(weights, (str, os.PathLike)) and str(weights).lower().endswith(self.files)


def _torch(channels_last: bool) -> Callable[..., Backend]:
    def build(weights: Any, device: torch.device, half: bool, fold_bn: bool) -> Backend:
        bf16 = half and half_precision(device) == "bf16"  # --half on a CPU with native bf16
        half = half and not bf16
        if isinstance(weights, nn.Module):
            return TorchBackend(weights, device, half, fold_bn, channels_last=channels_last, bf16=bf16)
        return TorchBackend.from_weights(weights, device, half, fold_bn, channels_last=channels_last, bf16=bf16)

    return build


def _onnxruntime(path: Any, device: torch.device, half: bool = False, fold_bn: bool = True) -> Backend:
    # an exported file is already folded and has its own precision; a cached one keeps its optimised graph
    cached = isinstance(path, Path) and path.parent == cache_dir() and device.type == "cpu"
    return OnnxBackend(path, device=device, optimized=optimized_path(path) if cached else None)


def _openvino(path: Any, device: torch.device, half: bool = False, fold_bn: bool = True) -> Backend:
    return OpenVinoBackend(path)


RUNTIMES: tuple[Runtime, ...] = (
    Runtime("torch", files=(), cached=False, precisions=("fp32", "fp16", "bf16"), devices=(), packages=(),
            build=_torch(channels_last=False)),
    Runtime("torch-cl", files=(), cached=False, precisions=("fp32", "fp16", "bf16"), devices=(), packages=(),
            build=_torch(channels_last=True)),  # torch with the channels_last (NHWC) memory layout
    Runtime("onnxruntime", files=(".onnx",), cached=True, precisions=("fp32", "int8"), devices=(),
            packages=("onnx", "onnxruntime"), build=_onnxruntime),
    Runtime("openvino", files=(".onnx",), cached=True, precisions=("fp32",), devices=("cpu",),
            packages=("onnx", "onnxruntime", "openvino"), build=_openvino),
)
BACKENDS = (AUTO, *(r.name for r in RUNTIMES))  # the --backend choices
INT8_BACKEND = next(r.name for r in RUNTIMES if "int8" in r.precisions)  # the one runtime of int8 models


def runtime(name: str) -> Runtime:
    """The row called `name`; ConfigError naming the choices for any other name."""
    for row in RUNTIMES:
        if row.name == name:
            return row
    raise ConfigError(f"--backend {name}: choose one of {', '.join(BACKENDS)}")


def installed(backend: str) -> bool:
    """Whether the packages `backend` needs are importable (`auto` falls back to torch without them;
    exporting the cached file needs onnx, and onnxruntime's check of it)."""
    return all(importlib.util.find_spec(p) is not None for p in runtime(backend).packages)


def exported_runtime(weights: Any) -> Runtime | None:
    """The first row that runs `weights` as an exported file (what ``auto`` gives it); None for weights."""
    return next((r for r in RUNTIMES if r.runs_file(weights)), None)


def choose_runtime(backend: str, device: torch.device, weights: Any, int8: bool = False) -> Runtime:
    """The row for ``--backend`` (``auto`` resolved as the module docstring says), or ConfigError when
    the row cannot run this device, ``--int8`` or these weights."""
    if backend != AUTO:
        row = runtime(backend)
    elif (row_for_file := exported_runtime(weights)) is not None:
        return row_for_file
    elif int8:
        return runtime(INT8_BACKEND)
    elif device.type != "cpu" or isinstance(weights, nn.Module):
        return runtime("torch")
    else:
        name = next((b for b in (DEFAULT_CPU_BACKEND, "onnxruntime") if installed(b)), "torch")
        return runtime(name)
    if row.devices and device.type not in row.devices:
        where = " or ".join(d.upper() for d in row.devices)
        raise ConfigError(f"--backend {row.name} runs on the {where}; use --device {row.devices[0]} "
                          f"(or --backend torch on {device})")
    if int8:
        # OpenVINO runs the onnxruntime QDQ model with coordinates off by pixels (its int8 path wants NNCF)
        check_precision("int8", device, row.name, supported=row.precisions)
    if not row.files and exported_runtime(weights) is not None:
        runners = " or ".join(r.name for r in RUNTIMES if r.files)
        raise ConfigError(f"--backend {row.name} needs .pt weights; {weights} is an exported model "
                          f"(use --backend {runners})")
    return row


def load_backend(weights: str | os.PathLike | nn.Module, spec: RuntimeSpec = RuntimeSpec(), *,
                 shapes: str = DEFAULT_SHAPES, fold_bn: bool = True) -> Backend:
    """The one dispatcher: the backend for `weights` (a KapaoModel, checkpoint, name or exported .onnx
    file) and `spec` (device, fp16, ``--backend``, int8 calibration).

    ``shapes``: ``dynamic`` or ``fixed`` (see the module docstring); ``fold_bn``: fold Conv+BN of a torch
    model (on a copy). Errors (ConfigError) in the order: shapes, fp16 without CUDA, the row's own
    (:func:`choose_runtime`), int8 of an exported file, fp16 of an fp32 export or of a cached runtime.
    """
    dev = spec.device if isinstance(spec.device, torch.device) else select_device(spec.device)
    if shapes not in SHAPE_POLICIES:
        raise ConfigError(f"shapes={shapes!r}: choose one of {', '.join(SHAPE_POLICIES)}")
    half = half_precision(dev) if spec.half else "fp32"
    check_precision(half, dev)
    if half == "bf16":
        return _bf16_backend(weights, spec, dev, fold_bn)
    row = choose_runtime(spec.backend, dev, weights, spec.int8 is not None)
    if not row.files:  # torch: runs the weights themselves
        return row.build(weights, dev, spec.half, fold_bn)
    if (file_row := exported_runtime(weights)) is not None:
        if spec.int8 is not None:
            raise ConfigError(f"--int8: {weights} is already exported; quantise the .pt weights "
                              "(kapao export --int8) or drop --int8")
        made = (row if row.runs_file(weights) else file_row).build(weights, dev, spec.half, fold_bn)
        if spec.half:
            check_precision(half, dev, file=str(weights), file_precision=made.info.precision)
        return made
    if not row.cached:
        raise ConfigError(f"--backend {row.name} runs exported {'/'.join(row.files)} files; export the weights first")
    check_precision(half, dev, row.name, supported=row.precisions)
    return _cached_backend(weights, row, dev, spec.int8, shapes)


def _bf16_backend(weights: str | os.PathLike | nn.Module, spec: RuntimeSpec, dev: torch.device,
                  fold_bn: bool) -> Backend:
    """``--half`` on a CPU with native bf16: torch autocast bf16 with channels_last (measured faster than
    OpenVINO's bf16 hint, README 'bf16') and one line saying so; int8, exported files and the other
    runtimes are refused."""
    if spec.int8 is not None:
        raise PrecisionError("--int8 and --half", "exclude each other (int8 or bf16 on the CPU); choose one")
    if exported_runtime(weights) is not None:
        raise ConfigError(f"--half on the CPU runs torch in bf16 and needs .pt weights; {weights} is an exported model")
    row = runtime("torch-cl" if spec.backend == AUTO else spec.backend)
    check_precision("bf16", dev, row.name, supported=row.precisions)
    LOGGER.info("--half: running the network in bfloat16 on the CPU (torch autocast, channels_last); "
                "decoding, NMS and fusion in fp32")
    return row.build(weights, dev, True, fold_bn)


def _cached_backend(weights: str | os.PathLike | nn.Module, row: Runtime, dev: torch.device,
                    int8: Int8Calibration | None, shapes: str) -> Backend:
    """`row` over the exported-model cache's ONNX file(s) of `weights` (one dynamic, or one per shape)."""
    model, loaded = (weights, {}) if isinstance(weights, nn.Module) else load_model(weights, device="cpu")
    stem = loaded.get("name") or (Path(loaded["path"]).stem if loaded.get("path") else f"kapao_{model.size}")
    precision = "int8" if int8 is not None else "fp32"
    info = BackendInfo(row.name, precision, dev, path=str(loaded["path"]) if loaded.get("path") else None,
                       name=loaded.get("name"), format=loaded.get("format"), details=loaded)

    def make(shape: tuple[int, int] | None) -> Backend:
        path = cached_onnx(model, stem, row.name, shape, int8)
        made = row.build(path, dev)
        made.info = dataclasses.replace(info, device=made.device, exported=str(path), fixed_shape=made.fixed_shape)
        return made

    if shapes == "fixed":
        return ShapeCacheBackend(make, model.schema, info, dev)
    return make(None)


class ShapeCacheBackend:
    """Fixed-shape exported models, one per input (h, w) seen, made on first sight by ``make`` and kept
    for the :data:`MAX_CACHED_SHAPES` most recently used shapes. Any multiple of 64 is accepted."""

    def __init__(self, make: Callable[[tuple[int, int]], Backend], schema: Any, info: BackendInfo,
                 device: torch.device, max_shapes: int = MAX_CACHED_SHAPES) -> None:
        self.make, self.max_shapes = make, max_shapes
        self.backends: OrderedDict[tuple[int, int], Backend] = OrderedDict()
        self.schema, self.device, self.half = schema, device, False
        self.fixed_shape: tuple[int, int] | None = None
        self.info = info

    def __repr__(self) -> str:
        return f"ShapeCacheBackend({self.info.runtime}, shapes {list(self.backends)})"

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
        h, w = static[2], static[3]  # NCHW
        self.fixed_shape = (h, w) if h is not None and w is not None else None
        self.schema, self.device, self.half = self.meta.schema, torch.device("cpu"), False
        self.info = onnx_info(self.meta, "openvino", self.device, str(path), self.fixed_shape)

    def __repr__(self) -> str:
        shape = "dynamic" if self.fixed_shape is None else f"{self.fixed_shape[0]}x{self.fixed_shape[1]}"
        return f"OpenVinoBackend(kapao-{self.meta.size}, {shape}, K={self.schema.num_keypoints})"

    def _run(self, x: Tensor) -> Tensor:
        arr = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        self.request.infer({0: arr})
        return torch.from_numpy(np.array(self.request.get_output_tensor(0).data, copy=True)).float()
