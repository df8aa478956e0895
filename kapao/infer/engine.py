"""The one inference path: BGR images letterboxed into a batch -> the backend's forward -> decode, NMS and
keypoint fusion -> :class:`~kapao.poses.Poses` in original-image pixels, each stage timed.

`Predictor` is shared by predict, val and training; the network behind it is a backend
(:mod:`kapao.backends.runtimes`: torch, onnxruntime, OpenVINO).
"""
from __future__ import annotations

import dataclasses
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from kapao.backends.runtimes import Backend, TorchBackend
from kapao.cfg.schema import MAX_STRIDE, HeadLayout, KeypointSchema
from kapao.cfg.settings import PREDICT_SETTINGS, InferenceSettings
from kapao.data.letterbox import letterbox
from kapao.errors import ConfigError
from kapao.infer.postprocess import postprocess
from kapao.infer.tta import tta_forward
from kapao.poses import Poses


# ----------------------------------------------------------------------------------------------
def prepare_batch(images: Sequence[np.ndarray], imgsz: int) -> tuple[Tensor, list[dict[str, Any]]]:
    """BGR images -> letterboxed (B, 3, H, W) uint8 RGB tensor with minimal (rectangular) padding.

    All images of a batch share one shape: the smallest multiple-of-64 rectangle that holds each
    image resized to long side `imgsz`. metas: orig_shape (h, w), ratio (rw, rh), pad (padw, padh).
    """
    shapes = []
    for im in images:
        h, w = im.shape[:2]
        r = imgsz / max(h, w)
        hw = max(1, round(h * r)), max(1, round(w * r))  # a very thin image keeps a side of at least 1 pixel
        shapes.append((math.ceil(hw[0] / MAX_STRIDE) * MAX_STRIDE, math.ceil(hw[1] / MAX_STRIDE) * MAX_STRIDE))
    target = (max(s[0] for s in shapes), max(s[1] for s in shapes))
    batch, metas = [], []
    for im in images:
        out, ratio, pad = letterbox(im, target, auto=False)
        batch.append(out)
        metas.append({"orig_shape": im.shape[:2], "ratio": ratio, "pad": pad})
    arr = np.stack(batch)[..., ::-1].transpose(0, 3, 1, 2)  # BGR HWC -> RGB CHW
    return torch.from_numpy(np.ascontiguousarray(arr)), metas


@dataclass
class Timing:
    """Accumulated seconds of pre-processing, inference and post-processing (NMS + fusion)."""

    pre: float = 0.0
    infer: float = 0.0
    post: float = 0.0
    images: int = 0

    def per_image_ms(self) -> dict[str, float]:
        n = max(self.images, 1)
        return {"pre": 1000 * self.pre / n, "infer": 1000 * self.infer / n, "post": 1000 * self.post / n}

    def summary(self) -> str:
        ms = self.per_image_ms()
        return f"{ms['pre']:.1f} ms pre-process, {ms['infer']:.1f} ms inference, {ms['post']:.1f} ms NMS+fusion per image"


class Predictor:
    """Network input tensor -> list of Poses, through a backend (:mod:`kapao.backends.runtimes`) or any forward callable.

    `forward` maps (B, 3, H, W) float in [0, 1] to decoded (B, N, 6 + 3K); pre-processing, TTA, NMS
    and keypoint fusion are the same whatever runs the network.
    """

    def __init__(self, forward: Backend | Callable[[Tensor], Tensor], schema: KeypointSchema, device: torch.device,
                 settings: InferenceSettings = PREDICT_SETTINGS, half: bool = False,
                 scales: Sequence[float] | None = None, flips: Sequence[bool] | None = None,
                 return_kp_objects: bool = False) -> None:
        if scales and flips and len(scales) != len(flips):
            raise ConfigError(f"--scales has {len(scales)} values but --flips has {len(flips)}; give one flip per scale")
        self.forward, self.schema, self.device = forward, schema, device
        self.layout = HeadLayout(schema.num_keypoints)
        self.settings, self.half = settings, half
        self.scales = list(scales) if scales else ([1.0] * len(flips) if flips else None)
        self.flips = list(flips) if flips else ([False] * len(self.scales) if self.scales else None)
        self.return_kp_objects = return_kp_objects
        self.timing = Timing()

    @classmethod
    def from_backend(cls, backend: Backend, settings: InferenceSettings = PREDICT_SETTINGS,
                     scales: Sequence[float] | None = None, flips: Sequence[bool] | None = None,
                     return_kp_objects: bool = False) -> "Predictor":
        """A predictor over a backend: its schema, device and precision."""
        return cls(backend, backend.schema, backend.device, settings, backend.half, scales, flips, return_kp_objects)

    @classmethod
    def from_model(cls, model: torch.nn.Module, device: torch.device, half: bool = False, fold_bn: bool = True,
                   **kwargs: Any) -> "Predictor":
        """A predictor over a KapaoModel (:class:`kapao.backends.runtimes.TorchBackend`: eval mode, Conv+BN folded on
        a copy, fp16 on CUDA if asked)."""
        return cls.from_backend(TorchBackend(model, device, half, fold_bn), **kwargs)

    @contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        setattr(self.timing, name, getattr(self.timing, name) + time.perf_counter() - t0)

    @torch.inference_mode()
    def __call__(self, images: Tensor, metas: Sequence[dict[str, Any]]) -> list[Poses]:
        """images: (B, 3, H, W) uint8 RGB letterboxed network input; metas as from `prepare_batch`."""
        x = images.to(self.device, non_blocking=True)
        x = (x.half() if self.half else x.float()) / 255.0
        with self._timed("infer"):
            if self.scales and self.flips is not None:  # flips is set whenever scales are
                pred = tta_forward(self.forward, x, self.scales, self.flips, self.layout, self.schema.flip_index)
            else:
                pred = self.forward(x)
        with self._timed("post"):
            out = postprocess(pred.float(), self.settings, self.layout, metas, self.return_kp_objects)
        out = [dataclasses.replace(p, orig_shape=tuple(m["orig_shape"]), schema=self.schema) for p, m in zip(out, metas)]
        self.timing.images += len(out)
        return out

    def predict_images(self, images: Sequence[np.ndarray], imgsz: int) -> list[Poses]:
        """BGR images (H, W, 3) -> Poses in their pixels."""
        with self._timed("pre"):
            batch, metas = prepare_batch(images, imgsz)
        return self(batch, metas)
