"""Backends of the exported formats other than ONNX: TorchScript (``.torchscript``, run by torch) and the
kapao metadata of an OpenVINO IR file (``.xml`` + ``.bin``, run by
:class:`kapao.backends.dispatch.OpenVinoBackend`).

Both carry the same metadata as a kapao ONNX file (:mod:`kapao.export` lists the keys; the schema travels
with the file, so no checkpoint is needed at runtime): a TorchScript file in its extra file
``kapao.json``, an IR file in its ``rt_info`` entry ``kapao_metadata`` (both one JSON object of strings).
A TorchScript file is traced at one input shape (the head's grids are fixed then): smaller inputs are
padded to it, as for a fixed-shape ONNX file.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kapao.backends.runtimes import FixedShapeRunner, OnnxInfo, onnx_info, parse_metadata
from kapao.errors import WeightsError
from kapao.runtime import select_device

TORCHSCRIPT_SUFFIX = ".torchscript"
OPENVINO_SUFFIX = ".xml"
TORCHSCRIPT_METADATA = "kapao.json"  # extra file of a TorchScript export
IR_METADATA = "kapao_metadata"  # rt_info entry of an OpenVINO IR export


def _exists(path: Path) -> None:
    if not path.is_file():
        raise WeightsError(f"exported model not found: {path}; check the path (export it with `kapao export`)")


class TorchScriptBackend(FixedShapeRunner):
    """A kapao TorchScript export run by torch on `device` (fp16 files on CUDA). Attributes as
    :class:`kapao.backends.runtimes.Backend`, plus ``meta`` (the file's OnnxInfo) and ``batch``."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu") -> None:
        path = Path(path)
        _exists(path)
        dev = device if isinstance(device, torch.device) else select_device(device)
        extra = {TORCHSCRIPT_METADATA: ""}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
                self.module = torch.jit.load(str(path), map_location=dev, _extra_files=extra).eval()
        except (RuntimeError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise WeightsError(f"{path} is not a readable TorchScript model ({first}); export it again") from None
        raw = extra[TORCHSCRIPT_METADATA]
        try:
            meta = json.loads(raw.decode() if isinstance(raw, bytes) else raw) if raw else {}
        except (ValueError, UnicodeDecodeError):
            meta = {}
        self.meta: OnnxInfo = parse_metadata(meta, str(path))
        if self.meta.half and dev.type != "cuda":
            raise WeightsError(f"{path} is an fp16 (--half) export, which needs CUDA; export without --half for the CPU")
        self.schema, self.device, self.half = self.meta.schema, dev, self.meta.half
        self.fixed_shape: tuple[int, int] | None = self.meta.imgsz
        self.batch: int | None = self.meta.batch
        self.info = onnx_info(self.meta, "torchscript", dev, str(path), self.fixed_shape)

    def __repr__(self) -> str:
        h, w = self.meta.imgsz
        return f"TorchScriptBackend(kapao-{self.meta.size}, {h}x{w}, {'fp16' if self.half else 'fp32'}, {self.device})"

    def _run(self, x: Tensor) -> Tensor:
        with torch.inference_mode():
            return self.module(x.to(self.device, torch.float16 if self.half else torch.float32)).float()


def ir_metadata(model: Any, path: str | os.PathLike) -> OnnxInfo:
    """The kapao metadata of an OpenVINO IR model (an ``openvino.Model`` read from `path`)."""
    meta: dict[str, Any] = {}
    if model.has_rt_info(IR_METADATA):
        try:
            meta = json.loads(model.get_rt_info(IR_METADATA).astype(str))
        except ValueError:
            meta = {}
    return parse_metadata(meta, str(path))
