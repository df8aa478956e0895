"""Person and keypoint-object NMS of decoded KAPAO predictions: candidate selection, the official
30 000-candidate cap, and torchvision's class-wise NMS stopped once max_det boxes are kept.

Every deliberate difference from the official implementation is listed at the top of
kapao/postprocess.py (the post-processing module that calls this one).
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import math
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch import Tensor

from kapao.cfg.schema import HeadLayout
from kapao.cfg.settings import InferenceSettings

MAX_NMS = 30_000  # candidates per image and NMS call (official value)


class Detections(NamedTuple):
    """NMS output of one image, in network-input pixels (the intermediate between nms and fusion)."""

    boxes: Tensor  # (n, 4) person boxes x1, y1, x2, y2
    scores: Tensor  # (n,) person score = objectness x person-class probability, descending
    keypoints: Tensor  # (n, K, 2) regressed keypoints x, y of each person
    kp_objects: Tensor  # (m, 6) x1, y1, x2, y2, score, keypoint index 0..K-1; descending score


def xywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(..., 4) centre x, y, width, height -> (..., 4) x1, y1, x2, y2 (same units)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), -1)


def check_pred(pred: Tensor, layout: HeadLayout) -> None:
    """Raise ValueError unless pred is (B, N, layout.num_outputs) decoded predictions."""
    if pred.ndim != 3 or pred.shape[-1] != layout.num_outputs:
        raise ValueError(f"predictions must be (B, N, {layout.num_outputs}) for K={layout.num_keypoints} "
                         f"(box 4, objectness 1, classes {layout.num_classes}, keypoints "
                         f"{2 * layout.num_keypoints}); got {tuple(pred.shape)}")


# torchvision.ops.batched_nms runs one NMS per class ("vanilla") above this many box coordinates,
# else one NMS over class-shifted boxes ("coordinate trick"); torchvision >= 0.22 (pytorch/vision#8925),
# earlier releases used 20 000 on CUDA. The early-stopping NMS below follows the same choice.
_TV_VERSION = tuple(int(v) for v in metadata.version("torchvision").split("+")[0].split(".")[:2])
_TV_VANILLA_NUMEL = {"cpu": 4000, "cuda": 100_000 if _TV_VERSION >= (0, 22) else 20_000}
NMS_FIRST_PREFIX = 1024  # candidates in the first early-stopping NMS round (at least 4 max_det)


@lru_cache(maxsize=None)
def _nms_kernel() -> Callable[[Tensor, Tensor, float], Tensor]:
    """torchvision's compiled NMS (``torch.ops.torchvision.nms``, what ``torchvision.ops.nms`` calls),
    loading only its extension library: the torchvision package import pulls torchvision.models and
    torch._dynamo (about 2 s of start-up). Falls back to importing the package where the library is
    not found or does not load on its own (it then registers the op)."""
    spec = importlib.util.find_spec("torchvision")
    folder = Path(spec.origin).parent if spec and spec.origin else None
    candidates = [folder / f"{stem}{suffix}" for stem in ("_C_stable", "_C")
                  for suffix in importlib.machinery.EXTENSION_SUFFIXES] if folder else []
    for path in (p for p in candidates if p.is_file()):
        try:
            torch.ops.load_library(str(path))
            return torch.ops.torchvision.nms
        except (OSError, RuntimeError, AttributeError):
            break
    import torchvision  # noqa: F401 - registers torch.ops.torchvision.nms

    return torch.ops.torchvision.nms


def _tv_uses_vanilla(boxes: Tensor) -> bool:
    """Whether torchvision.ops.batched_nms(boxes, ...) takes its per-class path (see _TV_VANILLA_NUMEL)."""
    return boxes.numel() > _TV_VANILLA_NUMEL.get(boxes.device.type, _TV_VANILLA_NUMEL["cuda"])


def _nms_subset(boxes: Tensor, scores: Tensor, classes: Tensor, iou: float, vanilla: bool,
                shift: Tensor) -> Tensor:
    """batched_nms's decisions, for the path it takes on the FULL candidate set, applied to a subset.

    vanilla: one torchvision nms per class; kept indices returned in descending score (stable).
    Else the coordinate trick with the full set's class shift (max coordinate + 1), so every box is
    shifted by bitwise the same amount as in the full call; kept indices in nms's (stable) order.
    """
    if not vanilla:
        return _nms_kernel()(boxes + (classes.to(boxes) * shift)[:, None], scores, iou)
    kept = torch.zeros_like(scores, dtype=torch.bool)
    for c in torch.unique(classes):
        idx = torch.where(classes == c)[0]
        kept[idx[_nms_kernel()(boxes[idx], scores[idx], iou)]] = True
    keep = torch.where(kept)[0]
    return keep[torch.sort(scores[keep], descending=True, stable=True).indices]


def batched_nms_top(boxes: Tensor, scores: Tensor, classes: Tensor, iou: float, max_det: int) -> Tensor:
    """``torchvision.ops.batched_nms(boxes, scores, classes, iou)[:max_det]``, stopping early; exactly
    equal scores in input order.

    boxes (n, 4) xyxy float, scores (n,) float, classes (n,) int; returns kept indices (<= max_det),
    descending score. Greedy NMS decides each box from the boxes processed before it (higher score,
    or equal score and lower index: torchvision's nms sorts stably). So NMS over a prefix of that
    processing order -- the `size` highest scores, ties at the cut taken in input order
    (`top_candidates`), passed in input order -- makes the same decisions there as over all boxes,
    and its kept boxes precede all others: once a prefix keeps max_det boxes the answer is final;
    else the prefix grows 2-4x (by the kept fraction so far), up to all boxes. Cutting inside a group
    of equal scores matters: a saturated network ties thousands of scores exactly. The path torchvision would
    take on all n boxes (per-class NMS, or one NMS over class-shifted boxes) is followed on every
    prefix, so every keep/suppress decision is bitwise torchvision's. The one difference: its
    per-class path orders the kept boxes with an unstable sort, which permutes exactly equal scores
    in a way only the full kept set determines; here they keep their input order (as torchvision's
    other path does), which also decides which of them fill the last places at max_det.
    """
    n = scores.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)  # what batched_nms returns
    if torch.jit.is_tracing():
        import torchvision  # only a traced graph needs the package's traceable batched_nms

        return torchvision.ops.batched_nms(boxes, scores, classes, iou)[:max_det]
    vanilla = _tv_uses_vanilla(boxes)
    shift = boxes.max() + torch.tensor(1).to(boxes)  # as torchvision's coordinate trick computes it
    size = max(NMS_FIRST_PREFIX, 4 * max_det) if bool(torch.isfinite(scores).all()) else n  # NaN: no prefixes
    while size < n:
        idx = top_candidates(scores, size)  # the first `size` boxes of the processing order, ascending
        keep = idx[_nms_subset(boxes[idx], scores[idx], classes[idx], iou, vanilla, shift)]
        if keep.numel() >= max_det:
            return keep[:max_det]
        # grow by the kept fraction seen so far (25 % spare), at least 2x so that rounds stay few, at most 4x
        size = min(4 * size, max(2 * size, math.ceil(1.25 * size * max_det / max(keep.numel(), 1))))
    return _nms_subset(boxes, scores, classes, iou, vanilla, shift)[:max_det]


def top_candidates(scores: Tensor, k: int) -> Tensor:
    """Indices (ascending) of the k highest of the (n,) scores; exactly equal scores at the cut are taken
    in index order -- the first k of a stable descending sort, as a set.

    The k-th largest value comes from numpy's partition on CPU (~2 ms for the ~10^6 evidence scores of
    a hot 1280 frame, against ~15 ms for torch.topk) and from torch.topk on other devices.
    NaN scores must have been removed by the caller; returns all indices when n <= k.
    """
    n = scores.numel()
    if n <= k:
        return torch.arange(n, device=scores.device)
    if scores.device.type == "cpu" and scores.dtype in (torch.float16, torch.float32, torch.float64):
        cut = float(np.partition(scores.detach().numpy(), n - k)[n - k])
    else:
        cut = float(torch.topk(scores, k, sorted=False).values.min())  # every device has topk
    chosen = scores > cut
    tied = scores == cut
    short = k - int(torch.count_nonzero(chosen))
    if int(torch.count_nonzero(tied)) == short:
        chosen |= tied
    else:
        chosen[torch.nonzero(tied).squeeze(1)[:short]] = True
    return torch.nonzero(chosen).squeeze(1)


def _nms_per_image(boxes: Tensor, scores: Tensor, classes: Tensor, images: Tensor, iou: float,
                   num_images: int, max_det: int) -> tuple[Tensor, list[int]]:
    """Class-wise NMS of the candidates of several images (`images` ascending, as nonzero gives).

    boxes (n, 4) xyxy, scores/classes/images (n,). Returns (kept indices, grouped by image and in
    descending score within an image, at most max_det per image; the per-image kept counts).
    One image at a time keeps the quadratic cost of NMS per image, not per batch; batched_nms_top
    stops once max_det boxes are kept, so an image with tens of thousands of candidates costs
    little more than one with a thousand.
    """
    keeps, counts, start = [], [], 0
    for n in torch.bincount(images, minlength=num_images).tolist():
        keep = torch.zeros(0, dtype=torch.long, device=boxes.device)
        if n:
            part = slice(start, start + n)
            s = scores[part]
            top = top_candidates(s, MAX_NMS) if n > MAX_NMS else None
            b, c = (boxes[part], classes[part]) if top is None else (boxes[part][top], classes[part][top])
            keep = batched_nms_top(b.float(), (s if top is None else s[top]).float(), c, iou, max_det)
            keep = (keep if top is None else top[keep]) + start
        keeps.append(keep)
        counts.append(keep.numel())
        start += n
    return (torch.cat(keeps) if keeps else torch.zeros(0, dtype=torch.long, device=boxes.device)), counts


def nms(pred: Tensor, settings: InferenceSettings, layout: HeadLayout) -> list[Detections]:
    """Person and keypoint-object NMS of decoded predictions, all images of the batch at once.

    pred: (B, N, layout.num_outputs) in network-input pixels: box cx, cy, w, h | objectness |
    1 + K class probabilities | 2K keypoint coordinates x1, y1, x2, y2, ...
    Returns one :class:`Detections` per image (network-input pixels). Thresholds come from
    `settings` (conf/iou/max_det for persons, conf_kp/iou_kp/max_det for keypoint objects).
    """
    check_pred(pred, layout)
    num_images, k = pred.shape[0], layout.num_keypoints
    obj = pred[..., layout.obj]
    score, cls = (pred[..., layout.cls] * obj.unsqueeze(-1)).max(-1)  # (B, N): argmax class, first on ties

    def select(person: bool, conf: float, iou: float) -> tuple[Tensor, Tensor, Tensor, list[int]]:
        wanted = (cls == 0) if person else (cls > 0)
        img, anchor = ((obj > conf) & (score > conf) & wanted).nonzero(as_tuple=True)
        boxes = xywh_to_xyxy(pred[img, anchor, layout.box])  # gathers 4 columns, not whole rows
        keep, counts = _nms_per_image(boxes, score[img, anchor], cls[img, anchor], img, iou,
                                      num_images, settings.max_det)
        return img[keep], anchor[keep], boxes[keep], counts

    img, anchor, boxes, counts = select(True, settings.conf, settings.iou)
    rows = pred[img, anchor]
    persons = (boxes, score[img, anchor], rows[:, layout.kpt].reshape(-1, k, 2))
    per_image = [torch.split(t, counts) for t in persons]

    img, anchor, boxes, counts = select(False, settings.conf_kp, settings.iou_kp)
    kp_objects = torch.cat((boxes, score[img, anchor, None], (cls[img, anchor, None] - 1).to(boxes.dtype)), 1)
    kp_per_image = torch.split(kp_objects, counts)
    return [Detections(b, s, kp, kpo) for b, s, kp, kpo in zip(*per_image, kp_per_image)]
