"""Runtime backends: one small interface between a network (torch, an exported ONNX file, ...) and the Predictor.

A backend maps the letterboxed network input to the decoded head output and says what it runs::

    x (B, 3, H, W) float RGB in [0, 1]  ->  (B, N, 6 + 3K) decoded predictions in network-input pixels

(channels as :class:`kapao.cfg.schema.HeadLayout`: box cx, cy, w, h | objectness | 1 + K class
probabilities | 2K keypoint x, y). Pre-processing, NMS and keypoint fusion stay in
:class:`kapao.infer.predictor.Predictor`, the one inference path, whatever the backend.

:func:`kapao.backends.dispatch.load_backend` picks the backend for a weights spec and ``--backend`` from
one table, :data:`kapao.backends.dispatch.RUNTIMES`: another runtime is one more class with the attributes
of :class:`Backend` and one more row there; the Predictor does not change. Every backend describes what it
runs in a :class:`BackendInfo`.

This module only reads exported files (their metadata, see :mod:`kapao.export` for the format);
writing them is the exporter's job.
"""
from __future__ import annotations

import copy
import importlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Mapping, Protocol, cast, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from kapao.backends.precision import check_precision
from kapao.cfg.schema import MAX_STRIDE, PAD_VALUE, HeadLayout, KeypointSchema
from kapao.errors import ConfigError, WeightsError
from kapao.models.network import decode
from kapao.runtime import cpu_count, select_device
from kapao.weights.loader import load_model

if TYPE_CHECKING:
    from kapao.models.network import KapaoModel

LOGGER = logging.getLogger(__name__)

ONNX_FORMAT = "kapao-onnx"  # metadata ``format`` of files written by kapao.export
ONNX_FORMAT_VERSION = 1
INSTALL_HINT = "pip install kapao[onnx]"
INPUT_PAD = PAD_VALUE / 255  # letterbox grey as network input in [0, 1]


@dataclass(frozen=True)
class BackendInfo:
    """What a backend runs, as records, messages and ``KAPAO.info`` read it.

    ``runtime``: its row in :data:`kapao.backends.dispatch.RUNTIMES` (torch, torch-cl, onnxruntime,
    openvino); ``precision``: fp32, fp16, bf16 or int8; ``device``: where it computes (an onnxruntime session
    without CUDA says cpu); ``path``: the weights named (a checkpoint or .onnx file; None for an in-memory
    model); ``name``: the registry name (``kapao_s_coco``) of named weights; ``format``: the file's format
    (``kapao``, ``official``, ``state_dict``, ``kapao-onnx``, ...); ``exported``: the exported file run
    (an .onnx given, or the exported-model cache's file; None for torch and for a cache of several fixed
    shapes); ``fixed_shape``: (h, w) every input is padded to, None when dynamic; ``details``: the rest of
    what the loader or the file's metadata said (epoch, size, schema, the raw ONNX metadata), read-only.
    """

    runtime: str
    precision: str = "fp32"
    device: torch.device = torch.device("cpu")
    path: str | None = None
    name: str | None = None
    format: str | None = None
    exported: str | None = None
    fixed_shape: tuple[int, int] | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "details", MappingProxyType(dict(self.details)))

    @property
    def int8(self) -> bool:
        """A statically quantised int8 model."""
        return self.precision == "int8"

    @property
    def dynamic(self) -> bool:
        """Any multiple of 64 runs as it is (no fixed input shape)."""
        return self.fixed_shape is None


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


@runtime_checkable
class Backend(Protocol):
    """What :class:`kapao.infer.predictor.Predictor` needs from a runtime.

    ``schema``: keypoint schema of the network; ``device``: where inputs are expected and outputs
    returned; ``half``: inputs are fp16 (else fp32); ``fixed_shape``: (h, w) every input is padded to,
    None when any multiple of 64 works; ``info``: what was loaded (:class:`BackendInfo`).
    """

    schema: KeypointSchema
    device: torch.device
    fixed_shape: tuple[int, int] | None
    info: BackendInfo

    @property
    def half(self) -> bool:
        """Inputs are fp16 (else fp32): an attribute or a property."""
        ...

    def __call__(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) float in [0, 1] -> (B, N, 6 + 3K) decoded predictions, network-input pixels."""
        ...


# ----------------------------------------------------------------------------------------------
# torch


class TorchBackend:
    """A KapaoModel run by torch: eval mode, Conv+BN folded on a copy (``fold_bn``), fp16 on CUDA if asked,
    NHWC (``channels_last``) memory layout if asked: the same numbers, convolutions laid out differently.
    ``bf16`` (a CPU with native bf16, what ``--half`` runs there): the network under
    ``torch.autocast("cpu", torch.bfloat16)`` with channels_last; inputs, decoding and outputs fp32.

    The caller's model is never changed (a copy is folded); without ``fold_bn`` the model itself is
    moved to ``device`` and put in eval mode, as before the copy existed.
    """

    def __init__(self, model: nn.Module, device: torch.device | None = None, half: bool = False,
                 fold_bn: bool = True, info: Mapping[str, Any] | None = None, channels_last: bool = False,
                 bf16: bool = False) -> None:
        device = device or torch.device("cpu")
        precision = "bf16" if bf16 else "fp16" if half else "fp32"
        check_precision(precision, device)
        if fold_bn:
            model = cast("KapaoModel", copy.deepcopy(model)).fold_bn()
        model = model.to(device).eval()
        self.model = model.half() if half else model.float()
        self.bf16 = bf16
        self.channels_last = channels_last or bf16  # oneDNN's bf16 convolutions are fastest in NHWC
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.schema = cast(KeypointSchema, model.schema)
        self.device, self.half = device, half
        self.fixed_shape: tuple[int, int] | None = None
        info = info or {}
        self.info = BackendInfo("torch-cl" if self.channels_last else "torch", precision, device,
                                path=_str_or_none(info.get("path")), name=info.get("name"), format=info.get("format"),
                                details=info)

    @classmethod
    def from_weights(cls, weights: str | os.PathLike, device: torch.device | None = None, half: bool = False,
                     fold_bn: bool = True, channels_last: bool = False, bf16: bool = False) -> "TorchBackend":
        """A checkpoint path or model name (as for :func:`kapao.weights.load_model`), loaded on the CPU first."""
        model, info = load_model(weights, device="cpu")
        return cls(model, device, half, fold_bn, info, channels_last, bf16)

    def __repr__(self) -> str:
        layout = ", channels_last" if self.channels_last else ""
        return f"TorchBackend(K={self.schema.num_keypoints}, {self.device}, {self.info.precision}{layout})"

    def __call__(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, N, 6 + 3K): the decoded first output of the eval forward."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if not self.bf16:
            return self.model(x)[0]
        net = cast("KapaoModel", self.model)  # bf16 runs the KapaoModel's raw forward and decoding apart
        with torch.autocast("cpu", dtype=torch.bfloat16):
            raw = net.forward_raw(x)
        # decoding in fp32: bf16's 8-bit mantissa would move coordinates by pixels at 1280
        return decode([r.float() for r in raw], net.anchors, net.strides, net.layout)


# ----------------------------------------------------------------------------------------------
# ONNX metadata


@dataclass(frozen=True)
class OnnxInfo:
    """The kapao metadata of an exported file, parsed."""

    schema: KeypointSchema
    imgsz: tuple[int, int]  # (h, w) the file was exported at
    size: str
    stride: int
    dynamic: bool
    half: bool
    batch: int | None
    kapao_version: str
    raw: dict[str, str]  # every metadata entry as stored

    @property
    def check(self) -> dict[str, Any] | None:
        return json.loads(self.raw["check"]) if self.raw.get("check") else None


def parse_metadata(meta: Mapping[str, str], where: str = "ONNX model") -> OnnxInfo:
    """:class:`OnnxInfo` from ``metadata_props`` strings; WeightsError for a file kapao did not export."""
    if meta.get("format") != ONNX_FORMAT or "schema" not in meta:
        raise WeightsError(f"{where} has no kapao metadata (schema, image size); export it with "
                           "`kapao export` (kapao.export.export_onnx)")
    if int(meta.get("format_version", "0")) > ONNX_FORMAT_VERSION:
        raise WeightsError(f"{where} was exported by a newer kapao (format version {meta['format_version']}); "
                           "upgrade kapao")
    try:
        schema = KeypointSchema.from_dict(json.loads(meta["schema"]), where=f"{where} metadata")
        h, w = json.loads(meta["imgsz"])
        batch = json.loads(meta.get("batch", "null"))
        return OnnxInfo(schema=schema, imgsz=(int(h), int(w)), size=meta.get("size", "?"),
                        stride=int(meta.get("stride", MAX_STRIDE)),
                        dynamic=bool(json.loads(meta.get("dynamic", "false"))),
                        half=bool(json.loads(meta.get("half", "false"))), batch=None if batch is None else int(batch),
                        kapao_version=meta.get("kapao_version", "?"), raw=dict(meta))
    except (ValueError, TypeError, KeyError, ConfigError) as e:
        raise WeightsError(f"{where} has unreadable kapao metadata ({e}); export it again") from None


def onnx_info(meta: OnnxInfo, runtime: str, device: torch.device, path: str,
              fixed_shape: tuple[int, int] | None) -> BackendInfo:
    """The :class:`BackendInfo` of an exported file run as it is: its own precision, format and metadata."""
    precision = "int8" if meta.raw.get("int8") else "fp16" if meta.half else "fp32"
    return BackendInfo(runtime, precision, device, path=path, format=meta.raw.get("format"), exported=path,
                       fixed_shape=fixed_shape, details=meta.raw)


def require(module: str, why: str) -> Any:
    """Import an optional dependency (onnx, onnxruntime) or raise WeightsError saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise WeightsError(f"{why} needs the '{module}' package, which is not installed; {INSTALL_HINT}") from None


def read_metadata(path: str | os.PathLike) -> OnnxInfo:
    """The kapao metadata of an exported ONNX file (read with onnx, weights not loaded)."""
    onnx = require("onnx", "reading ONNX metadata")
    path = Path(path)
    _check_file(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - onnx raises many kinds for a damaged file
        raise _corrupt(path, e) from None
    return parse_metadata({p.key: p.value for p in proto.metadata_props}, where=str(path))


def _check_file(path: Path) -> None:
    if not path.exists():
        raise WeightsError(f"ONNX model not found: {path}; check the path or create it with `kapao export`")
    if not path.is_file():
        raise WeightsError(f"ONNX model path {path} is a folder, not a file; pass the .onnx file inside it")


def _corrupt(path: Path | str, e: BaseException) -> WeightsError:
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    return WeightsError(f"{path} is not a readable ONNX model ({type(e).__name__}: {reason}); "
                        "export it again with `kapao export`")


# ----------------------------------------------------------------------------------------------
# exported files


class FixedShapeRunner:
    """The input handling shared by backends of exported files: a fixed-shape model gets smaller inputs
    padded and batches split to its batch size. Subclasses set ``fixed_shape``, ``batch`` and ``_run``."""

    fixed_shape: tuple[int, int] | None
    batch: int | None

    def _run(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) in the model's own shape -> (B, N, no) float32 on the CPU."""
        raise NotImplementedError

    def __call__(self, x: Tensor) -> Tensor:
        """x: (B, 3, H, W) float RGB in [0, 1] -> (B, N, no) float32 decoded predictions (input pixels).

        A fixed-shape model gets inputs smaller than its shape padded right/bottom with letterbox grey
        (coordinates are unchanged: they are measured from the top-left corner) and batches split/padded
        to its batch size; a larger input is an error.
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{type(self).__name__}: input must be (B, 3, H, W), got {tuple(x.shape)}")
        device = x.device
        if self.fixed_shape is not None:
            x = self._pad_to_shape(x)
        if self.batch is None or x.shape[0] == self.batch:
            y = self._run(x)
        else:
            y = torch.cat([self._run_padded_batch(x[i:i + self.batch]) for i in range(0, x.shape[0], self.batch)])
        return y.to(device)

    def _pad_to_shape(self, x: Tensor) -> Tensor:
        assert self.fixed_shape is not None  # called for fixed-shape models only
        (h, w), (fh, fw) = x.shape[-2:], self.fixed_shape
        if h > fh or w > fw:
            raise ConfigError(f"input {h}x{w} does not fit the ONNX model's fixed input {fh}x{fw}; use --imgsz "
                              f"{max(fh, fw)} or less, or export with --dynamic")
        if (h, w) == (fh, fw):
            return x
        return torch.nn.functional.pad(x, [0, fw - w, 0, fh - h], value=INPUT_PAD)

    def _run_padded_batch(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        assert self.batch is not None  # called for fixed-batch models only
        if n < self.batch:
            x = torch.cat((x, x.new_full((self.batch - n, *x.shape[1:]), INPUT_PAD)))
        return self._run(x)[:n]


# ----------------------------------------------------------------------------------------------
# onnxruntime


def _require_onnxruntime() -> Any:
    try:
        import onnxruntime  # optional, heavy: only for .onnx models
    except ImportError:
        raise WeightsError("running .onnx models needs onnxruntime, which is not installed; "
                           f"{INSTALL_HINT} (onnxruntime-gpu for CUDA)") from None
    return onnxruntime


def _ort_providers(ort: Any, dev: torch.device) -> tuple[list[Any], torch.device]:
    """onnxruntime providers for `dev`, and the device actually used (CPU when CUDA is not available)."""
    providers: list[Any] = ["CPUExecutionProvider"]
    if dev.type == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": dev.index or 0}))
        else:
            LOGGER.warning("onnxruntime here has no CUDA support (install onnxruntime-gpu); running the "
                           "ONNX model on the CPU")
            dev = torch.device("cpu")
    return providers, dev


def _ort_session(ort: Any, model: str | bytes, providers: list[Any], threads: int | None, where: str,
                 optimized: Path | None = None) -> Any:
    """An onnxruntime session of `model` (all graph optimisations). With `optimized` (a file path): the
    optimised graph is kept there on the first creation (written aside, then renamed) and loaded without
    optimising again afterwards -- the caller puts what the graph depends on (source file, onnxruntime
    version, CPU) in its name."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or cpu_count(physical=True)
    opts.inter_op_num_threads = 1
    # no busy-waiting between runs: predict does NMS, drawing and video writing on the same cores
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3  # errors only (saving an optimised graph warns that it is hardware-specific)
    if optimized is not None and optimized.is_file():
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            return ort.InferenceSession(str(optimized), opts, providers=providers)
        except Exception:  # noqa: BLE001 - a damaged optimised file: optimise the model again
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    tmp = None if optimized is None else optimized.with_name(f".{optimized.name}.{os.getpid()}.tmp")
    if tmp is not None:
        try:
            tmp.parent.mkdir(parents=True, exist_ok=True)
            opts.optimized_model_filepath = str(tmp)
        except OSError:  # an unwritable cache folder: optimise every time, as without the cache
            tmp = None
    try:
        session = ort.InferenceSession(model, opts, providers=providers)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own kinds for a bad model
        raise _corrupt(where, e) from None
    if tmp is not None and optimized is not None:
        try:
            os.replace(tmp, optimized)
        except OSError:  # the optimised copy is a saving, not a need
            tmp.unlink(missing_ok=True)
    return session


class OnnxBackend(FixedShapeRunner):
    """An exported kapao ONNX file run by onnxruntime.

    ``path``: the .onnx file (bytes of a model are accepted too); ``device``: 'cpu', a GPU index, or a
    torch.device -- CUDA uses onnxruntime's CUDAExecutionProvider when available (onnxruntime-gpu),
    else falls back to CPU with a warning; ``providers`` overrides the choice; ``threads``: intra-op
    threads (default: physical cores); ``optimized``: a file to keep onnxruntime's optimised graph in
    and load it from next time (the exported-model cache: :func:`kapao.backends.cache.optimized_path`).

    Attributes: ``schema``, ``layout``, ``imgsz`` (h, w) exported at, ``dynamic``, ``half`` (= ``fp16``),
    ``fixed_shape`` ((h, w) every input must be padded to, None when dynamic), ``batch`` (fixed
    batch size or None), ``device`` (where outputs are returned), ``provider``, ``meta`` (OnnxInfo),
    ``info`` (path, format 'onnx' and the raw metadata).
    """

    def __init__(self, path: str | os.PathLike | bytes, device: str | torch.device = "cpu",
                 providers: list[Any] | None = None, threads: int | None = None,
                 optimized: str | os.PathLike | None = None) -> None:
        ort = _require_onnxruntime()
        where = "ONNX model (bytes)" if isinstance(path, bytes) else str(path)
        if not isinstance(path, bytes):
            path = Path(path)
            _check_file(path)
        dev = device if isinstance(device, torch.device) else select_device(device)
        if providers is None:
            providers, dev = _ort_providers(ort, dev)
        self.session = _ort_session(ort, path if isinstance(path, bytes) else str(path), providers, threads, where,
                                    Path(optimized) if optimized is not None else None)
        self.meta = parse_metadata(self.session.get_modelmeta().custom_metadata_map, where)
        self.schema: KeypointSchema = self.meta.schema
        self.layout = HeadLayout(self.schema.num_keypoints)
        self._read_io()
        self.imgsz: tuple[int, int] = self.meta.imgsz
        self.provider = self.session.get_providers()[0]
        self.device = dev if self.provider == "CUDAExecutionProvider" else torch.device("cpu")
        self.info = onnx_info(self.meta, "onnxruntime", self.device, where, self.fixed_shape)
        check_precision("fp32", self.device, file=where, file_precision=self.info.precision)

    def _read_io(self) -> None:
        """Input/output names, dtype and (fixed or free) shape from the session."""
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        self.input_name, self.output_name = inp.name, out.name
        self.fp16 = inp.type == "tensor(float16)"
        self._np_dtype = np.float16 if self.fp16 else np.float32
        dims = list(inp.shape)
        self.batch: int | None = dims[0] if isinstance(dims[0], int) else None
        self.fixed_shape: tuple[int, int] | None = (
            (int(dims[2]), int(dims[3])) if all(isinstance(d, int) for d in dims[2:]) else None)
        self.dynamic = self.fixed_shape is None

    @property
    def half(self) -> bool:
        """Inputs are fp16 (an fp16 export)."""
        return self.fp16

    def __repr__(self) -> str:
        shape = "dynamic" if self.fixed_shape is None else f"{self.fixed_shape[0]}x{self.fixed_shape[1]}"
        return (f"OnnxBackend(kapao-{self.meta.size}, {shape}, {'fp16' if self.fp16 else 'fp32'}, "
                f"{self.provider}, K={self.schema.num_keypoints})")

    def _run(self, x: Tensor) -> Tensor:
        arr = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=self._np_dtype)
        y = self.session.run([self.output_name], {self.input_name: arr})[0]
        return torch.from_numpy(y).float()
