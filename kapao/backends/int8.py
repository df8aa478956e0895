"""Static int8 quantisation of an exported KAPAO graph, calibrated on real images (onnxruntime QDQ).

The graph is first pre-processed as onnxruntime advises (shape inference and its basic graph
optimisations, ``quant_pre_process``); then the backbone and neck convolutions get int8 weights (per
output channel, symmetric) and unsigned 8-bit activations whose ranges are measured (min/max) on
calibration images letterboxed as predict does. Unsigned activations because x86 VNNI multiplies
u8 x s8: with signed activations onnxruntime falls back to slower kernels and int8 is slower than
fp32 (:data:`INT8_RECIPE` is the whole recipe; changing it changes the exported-model cache key);
the head's 1x1 output convolutions and the decoding after them stay fp32, because they produce the
box and keypoint coordinates. The result is an ordinary kapao ONNX file (same input, output and
metadata, plus ``int8``: what it was calibrated on) for onnxruntime. (OpenVINO runs such a file
too, but with coordinates pixels away from fp32: an OpenVINO int8 path would use NNCF instead.)

Calibration images come from a folder (``--calib DIR``) or a dataset config (``--data``: its val
split, else train), spread evenly over the sorted file list.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from kapao.backends.onnx_graph import INPUT_NAME, set_metadata
from kapao.backends.runtimes import require
from kapao.cfg.dataset import load_dataset_config
from kapao.cfg.schema import IMAGE_SUFFIXES
from kapao.data.letterbox import letterbox
from kapao.data.sources import load_image
from kapao.errors import ConfigError, DataError

LOGGER = logging.getLogger(__name__)

DEFAULT_CALIB_IMAGES = 32  # enough for stable min/max ranges; the 4 already gave a usable model
INT8_METADATA = "int8"  # metadata key: JSON {images, imgsz, digest, recipe} of the calibration
# The quantisation recipe, a part of the exported-model cache key. Its alternatives (per-tensor weights,
# reduce_range, signed activations, more layers in fp32, OpenVINO/NNCF) were measured no better in speed
# or agreement with fp32: README, section 'int8'.
INT8_RECIPE: dict[str, Any] = {"format": "QDQ", "activations": "QUInt8", "weights": "QInt8", "per_channel": True,
                               "reduce_range": False, "calibration": "MinMax", "pre_process": True,
                               "fp32": "head and after"}


@dataclass(frozen=True)
class Int8Calibration:
    """What an int8 model is calibrated on: image files, letterboxed to ``imgsz`` (the size it will
    mostly run at). ``digest`` (paths, sizes, modification times, imgsz) keys cached int8 models."""

    images: tuple[Path, ...]
    imgsz: int

    @property
    def digest(self) -> str:
        h = hashlib.sha256(f"imgsz={self.imgsz}".encode())
        for p in self.images:
            st = Path(p).stat()
            h.update(f"|{Path(p).resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    @classmethod
    def from_spec(cls, spec: str | os.PathLike, imgsz: int, count: int = DEFAULT_CALIB_IMAGES) -> "Int8Calibration":
        """``--calib DIR`` or ``--data DATA`` and ``--calib-images N``, see :func:`calibration_images`."""
        return cls(tuple(calibration_images(spec, count)), int(imgsz))


def calibration_images(spec: str | os.PathLike, count: int = DEFAULT_CALIB_IMAGES) -> list[Path]:
    """Up to `count` image files for calibration: from a folder, else from a dataset config's val (or
    train) split; evenly spread over the sorted files. DataError when there are none."""
    if count < 1:
        raise ConfigError(f"--calib-images {count}: must be at least 1")
    folder = Path(spec)
    if not folder.is_dir():
        cfg = load_dataset_config(spec)
        split = "val" if "val" in cfg.images else "train"
        folder = cfg.require(split)[0]
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"no calibration images in {folder} (looked for {', '.join(IMAGE_SUFFIXES)}); "
                        "give --calib a folder of typical images")
    if len(files) <= count:
        return files
    return [files[i * len(files) // count] for i in range(count)]


def calibration_tensor(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """(1, 3, h, w) float32 RGB in [0, 1]: an image letterboxed to `shape` as the network sees it."""
    out, _, _ = letterbox(load_image(path), shape, auto=False)
    return np.ascontiguousarray(out[..., ::-1].transpose(2, 0, 1))[None].astype(np.float32) / 255.0


def _reader(images: Sequence[Path], shape: tuple[int, int]) -> Any:
    """An onnxruntime CalibrationDataReader over the letterboxed images (read one at a time)."""
    quant = require("onnxruntime.quantization", "int8 quantisation")

    base: Any = quant.CalibrationDataReader  # a class of a module imported at run time

    class Reader(base):
        def __init__(self) -> None:
            self.todo = list(images)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return {INPUT_NAME: calibration_tensor(self.todo.pop(0), shape)} if self.todo else None

    return Reader()


def quantize_int8(model: bytes, calib: Int8Calibration, keep_fp32_prefix: str,
                  shape: tuple[int, int] | None = None) -> bytes:
    """A statically quantised copy (:data:`INT8_RECIPE`: QDQ, u8 activations, per-channel s8 weights)
    of the serialized kapao graph `model`.

    Activation ranges are the min/max over `calib`'s images letterboxed to `shape` (a fixed-shape
    model's input; None: calib.imgsz square); nodes whose name starts with
    `keep_fp32_prefix` (the head: :func:`kapao.backends.onnx_graph.head_scope`) and everything after them stay
    fp32. Metadata is carried over, plus ``int8``.
    """
    onnx = require("onnx", "int8 quantisation")
    quant = require("onnxruntime.quantization", "int8 quantisation")
    proto = onnx.load_from_string(model)
    keep = _fp32_tail(proto, keep_fp32_prefix)
    LOGGER.debug("int8: calibrating on %d images at %d; %d nodes stay fp32", len(calib.images), calib.imgsz, len(keep))
    reader = _reader(calib.images, shape or (calib.imgsz, calib.imgsz))
    with tempfile.TemporaryDirectory(prefix="kapao-int8-") as tmp, _quiet_root_logger():
        src, pre, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(model)
        if INT8_RECIPE["pre_process"]:
            # symbolic shape inference cannot resolve the dynamic graph's decoding; onnx's own inference suffices
            require("onnxruntime.quantization.shape_inference", "int8 quantisation").quant_pre_process(
                str(src), str(pre), skip_symbolic_shape=True)
        else:
            pre = src
        quant.quantize_static(str(pre), str(dst), reader,
                              quant_format=getattr(quant.QuantFormat, INT8_RECIPE["format"]),
                              per_channel=INT8_RECIPE["per_channel"], reduce_range=INT8_RECIPE["reduce_range"],
                              activation_type=getattr(quant.QuantType, INT8_RECIPE["activations"]),
                              weight_type=getattr(quant.QuantType, INT8_RECIPE["weights"]),
                              nodes_to_exclude=sorted(keep),
                              calibrate_method=getattr(quant.CalibrationMethod, INT8_RECIPE["calibration"]))
        out = onnx.load(str(dst))
    meta = {p.key: p.value for p in proto.metadata_props}
    meta[INT8_METADATA] = json.dumps({"images": len(calib.images), "imgsz": calib.imgsz, "digest": calib.digest,
                                      "recipe": recipe_digest()})
    set_metadata(out, meta)
    return out.SerializeToString()


def recipe_digest() -> str:
    """A short hash of :data:`INT8_RECIPE`: part of the exported-model cache key and the int8 metadata."""
    return hashlib.sha256(json.dumps(INT8_RECIPE, sort_keys=True).encode()).hexdigest()[:12]


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime's quantiser warns through the root logger (per conv bias, pre-processing advice):
    silence WARNING and below while it runs."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _fp32_tail(proto: Any, prefix: str) -> set[str]:
    """Names of the nodes under `prefix` and of every node that consumes their outputs, transitively."""
    consumers: dict[str, list[Any]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    todo = [n for n in proto.graph.node if n.name.startswith(prefix)]
    if not todo:
        raise ConfigError(f"int8: no node of the head ({prefix}) in the graph; export the model again")
    seen: set[str] = set()
    while todo:
        node = todo.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        todo.extend(c for out in node.output for c in consumers.get(out, ()))
    return seen
