"""Test-time augmentation: run the model on rescaled / flipped copies of a batch, map every pass back
to the un-augmented input and concatenate, ready for NMS."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from kapao.cfg.schema import MAX_STRIDE, OFFICIAL_TTA, PAD_VALUE, HeadLayout

TTA_SCALES, TTA_FLIPS = OFFICIAL_TTA  # official test-time augmentation: scales, left-right flip per scale
# grey padding of rescaled TTA inputs: PAD_VALUE / 255 rounded as the official scale_img does (kept for equal outputs)
TTA_PAD_VALUE = round(PAD_VALUE / 255, 3)


def _pair(scale: float | Sequence[float]) -> tuple[float, float]:
    if isinstance(scale, (int, float)):
        return float(scale), float(scale)
    return float(scale[0]), float(scale[1])


def deaugment(pred: Tensor, scale: float | Sequence[float], flip_lr: bool, img_width: float,
              layout: HeadLayout, flip_index: Sequence[int]) -> Tensor:
    """Map the predictions of one augmented pass back to the un-augmented network input.

    pred: (B, N, no) decoded predictions of the input that was (optionally) flipped left-right and
    then resized by `scale` (float or (sx, sy): augmented pixels = original pixels x scale).
    img_width: width W of the un-augmented input. Boxes and keypoints are divided by the scale; with
    flip_lr, x -> W - x for box centres and keypoints, and keypoint classes and keypoint coordinates
    are swapped back: new[k] = old[flip_index[k]] (official _descale_pred). Returns a new tensor.
    """
    sx, sy = _pair(scale)
    k = layout.num_keypoints
    if len(flip_index) != k:
        raise ValueError(f"flip_index has {len(flip_index)} entries for K={k}")
    out = pred.clone()
    div = torch.tensor([sx, sy, sx, sy], dtype=pred.dtype, device=pred.device)
    out[..., layout.box] = pred[..., layout.box] / div
    kp = pred[..., layout.kpt].unflatten(-1, (k, 2)) / torch.tensor([sx, sy], dtype=pred.dtype, device=pred.device)
    if flip_lr:
        perm = torch.as_tensor(list(flip_index), dtype=torch.long, device=pred.device)
        out[..., 0] = img_width - out[..., 0]
        kp = torch.stack((img_width - kp[..., 0], kp[..., 1]), -1)[..., perm, :]
        kp_cls = slice(layout.cls.start + 1, layout.cls.stop)
        out[..., kp_cls] = pred[..., kp_cls][..., perm]
    out[..., layout.kpt] = kp.flatten(-2)
    return out


def merge_tta(outputs: Sequence[Tensor], scales: Sequence[float | Sequence[float]], flips: Sequence[bool],
              img_width: float, layout: HeadLayout, flip_index: Sequence[int]) -> Tensor:
    """Deaugment each pass's (B, N_i, no) output and concatenate: (B, sum N_i, no), ready for nms."""
    if not (len(outputs) == len(scales) == len(flips)):
        raise ValueError(f"merge_tta: {len(outputs)} outputs, {len(scales)} scales, {len(flips)} flips")
    return torch.cat([deaugment(o, s, bool(f), img_width, layout, flip_index)
                      for o, s, f in zip(outputs, scales, flips)], 1)


def tta_forward(model_fn: Callable[[Tensor], Tensor], images: Tensor, scales: Sequence[float],
                flips: Sequence[bool], layout: HeadLayout, flip_index: Sequence[int],
                stride: int = MAX_STRIDE) -> Tensor:
    """Augmented inference: one forward pass per (scale, flip), all mapped back and concatenated.

    images: (B, 3, H, W) network input (H, W multiples of stride). For each pass the batch is
    flipped left-right if asked, and for scale != 1 resized (bilinear) to (int(H s), int(W s)) and
    padded right/bottom with grey to the next multiple of `stride` (official scale_img; the official
    TTA is TTA_SCALES with TTA_FLIPS). model_fn maps an image batch to decoded predictions
    (B, N, no) (of a tuple, the first item is used). Passes are de-scaled by the exact resize
    factors (new size / old size per axis; the official divides by the nominal scale).
    Returns (B, sum N_i, no) in pixels of `images`, ready for nms/postprocess.
    """
    if len(scales) != len(flips):
        raise ValueError(f"tta_forward: {len(scales)} scales but {len(flips)} flips")
    h, w = images.shape[-2:]
    outputs, factors = [], []
    for s, f in zip(scales, flips):
        x = images.flip(-1) if f else images
        factor: tuple[float, float] = (1.0, 1.0)
        if s != 1.0:
            nh, nw = int(h * s), int(w * s)
            x = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False)
            ph, pw = math.ceil(h * s / stride) * stride, math.ceil(w * s / stride) * stride
            x = torch.nn.functional.pad(x, [0, pw - nw, 0, ph - nh], value=TTA_PAD_VALUE)
            factor = (nw / w, nh / h)
        y = model_fn(x)
        outputs.append(y[0] if isinstance(y, (tuple, list)) else y)
        factors.append(factor)
    return merge_tta(outputs, factors, flips, w, layout, flip_index)
