"""A KAPAO network as an ONNX graph in memory: tracing and the kapao metadata, nothing written.

Shared by the `export` verb (:mod:`kapao.export`: files the user asked for, checked against torch)
and by the cache of exported models that the fast CPU backends build on first use
(:mod:`kapao.backends.cache`), so inference can get an ONNX graph without importing the export verb.
The graph and the metadata keys are described in :mod:`kapao.export`.
"""
from __future__ import annotations

import copy
import io
import json
import warnings
from typing import Any, Mapping, cast

import torch
from torch import Tensor, nn

from kapao.backends.runtimes import ONNX_FORMAT, ONNX_FORMAT_VERSION
from kapao.cfg.schema import MAX_STRIDE, STRIDES, KeypointSchema
from kapao.errors import ConfigError
from kapao.version import __version__

INPUT_NAME = "images"
OUTPUT_NAME = "output"
MIN_OPSET = 13  # SiLU is exported as Sigmoid * Mul; 13 is the oldest opset tested
DEFAULT_OPSET = 17


class DecodedOutput(nn.Module):
    """The export graph: images (B, 3, H, W) float in [0, 1] -> decoded (B, N, no) in input pixels.

    Puts the model in eval mode (the decoded output exists only there) and returns the first item of
    its eval forward, as :meth:`kapao.infer.predictor.Predictor.from_model` does.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.eval()  # torch.onnx.export restores the wrapper's mode, recursively, after tracing

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)[0]


def inference_copy(model: nn.Module, device: torch.device, half: bool = False) -> DecodedOutput:
    """A frozen, Conv+BN-folded, eval-mode copy of `model` behind :class:`DecodedOutput` (the caller's
    model is untouched)."""
    net = copy.deepcopy(model).float().to(device).eval()
    fold_bn = getattr(net, "fold_bn", None)
    if fold_bn is not None:
        fold_bn()
    if half:
        net = net.half()
    for p in net.parameters():
        p.requires_grad_(False)
    return DecodedOutput(net)


def export_metadata(model: nn.Module, imgsz: tuple[int, int], *, dynamic: bool, half: bool, batch: int,
                    opset: int, source: str = "") -> dict[str, str]:
    """The ``metadata_props`` of an exported model (see :mod:`kapao.export`)."""
    schema = cast(KeypointSchema, model.schema)
    return {
        "format": ONNX_FORMAT,
        "format_version": str(ONNX_FORMAT_VERSION),
        "kapao_version": __version__,
        "size": str(model.size),
        "imgsz": json.dumps(list(imgsz)),
        "batch": json.dumps(None if dynamic else int(batch)),
        "stride": str(MAX_STRIDE),
        "strides": json.dumps(list(getattr(model, "strides", STRIDES))),
        "dynamic": json.dumps(bool(dynamic)),
        "half": json.dumps(bool(half)),
        "opset": str(opset),
        "num_keypoints": str(schema.num_keypoints),
        "schema": json.dumps(schema.to_dict()),
        "names": json.dumps(list(schema.class_names)),
        "source": source,
    }


def set_metadata(proto: Any, meta: Mapping[str, str]) -> None:
    """Add or replace ``metadata_props`` entries of an onnx ModelProto (the other entries are kept)."""
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in meta]
    del proto.metadata_props[:]
    for k, v in [*kept, *meta.items()]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v


def trace(wrapper: nn.Module, x: Tensor, opset: int, dynamic: bool) -> bytes:
    """The serialized ONNX graph of `wrapper` traced on the example input `x` (B, 3, H, W)."""
    axes = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, OUTPUT_NAME: {0: "batch", 1: "anchors"}}
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # the input-shape check and grid sizes read tensor shapes (traced symbolically: harmless), and
        # the TorchScript exporter announces its deprecation; kapao uses it because the dynamo
        # exporter needs the extra 'onnxscript' package
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*(legacy TorchScript-based ONNX export|will be removed).*")
        try:
            # torch.onnx.export writes to file objects as documented; its annotation names paths only
            torch.onnx.export(wrapper, (x,), buf, dynamo=False,  # type: ignore[arg-type]
                              opset_version=opset, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes=axes if dynamic else None, do_constant_folding=True)
        except Exception as e:  # noqa: BLE001 - unsupported opset and the like
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ConfigError(f"ONNX export failed at opset {opset} ({type(e).__name__}: {first}); "
                              f"try the default --opset {DEFAULT_OPSET}") from None
    return buf.getvalue()


def head_scope(model: nn.Module) -> str:
    """The ONNX node-name prefix of the head's layer in a graph traced through :class:`DecodedOutput`
    (``/model/model.<i>/``): int8 quantisation leaves the head and the decoding after it in fp32."""
    return f"/model/model.{len(cast(nn.ModuleList, model.model)) - 1}/"
