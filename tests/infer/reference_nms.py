"""The NMS of kapao.infer.postprocess before the early-stopping rewrite, kept verbatim as the reference.

tests/infer/test_nms.py proves the current kapao.infer.postprocess.nms identical to this on random and "hot"
inputs (it loads this file by path: tests never import scripts as a package), and scripts/benchmark.py
times it next to the current one. Not used by the library.
"""
from __future__ import annotations

import torch
import torchvision
from torch import Tensor

from kapao.cfg.schema import HeadLayout
from kapao.cfg.settings import InferenceSettings
from kapao.infer.nms import Detections, xywh_to_xyxy

MAX_NMS = 30_000  # candidates per image and NMS call (official value)


def _nms_per_image(boxes: Tensor, scores: Tensor, classes: Tensor, images: Tensor, iou: float,
                   num_images: int, max_det: int) -> tuple[Tensor, list[int]]:
    """Class-wise NMS of the candidates of several images (the previous implementation)."""
    keeps, counts, start = [], [], 0
    for n in torch.bincount(images, minlength=num_images).tolist():
        keep = torch.zeros(0, dtype=torch.long, device=boxes.device)
        if n:
            part = slice(start, start + n)
            s = scores[part]
            top = torch.sort(s, descending=True, stable=True).indices[:MAX_NMS] if n > MAX_NMS else None
            b, c = (boxes[part], classes[part]) if top is None else (boxes[part][top], classes[part][top])
            keep = torchvision.ops.batched_nms(b.float(), (s if top is None else s[top]).float(), c, iou)[:max_det]
            keep = (keep if top is None else top[keep]) + start
        keeps.append(keep)
        counts.append(keep.numel())
        start += n
    return (torch.cat(keeps) if keeps else torch.zeros(0, dtype=torch.long, device=boxes.device)), counts


def nms(pred: Tensor, settings: InferenceSettings, layout: HeadLayout) -> list[Detections]:
    """Person and keypoint-object NMS of decoded predictions (the previous implementation)."""
    num_images, k = pred.shape[0], layout.num_keypoints
    obj = pred[..., layout.obj]
    score, cls = (pred[..., layout.cls] * obj.unsqueeze(-1)).max(-1)  # (B, N): argmax class, first on ties

    def select(person: bool, conf: float, iou: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        wanted = (cls == 0) if person else (cls > 0)
        img, anchor = ((obj > conf) & (score > conf) & wanted).nonzero(as_tuple=True)
        boxes = xywh_to_xyxy(pred[img, anchor][:, layout.box])
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


def set_hot_biases(model: torch.nn.Module, obj: float = 2.0, cls: float = 0.0) -> torch.nn.Module:
    """Make a KapaoModel "hot": every output conv's objectness bias = obj, class biases = cls (in place).

    With random weights nearly every anchor then passes low thresholds (sigmoid(2) = 0.88 x ~0.5),
    the worst case for NMS. The head's conv bias is laid out (anchors, HeadLayout outputs).
    """
    head, layout = model.head, model.layout
    with torch.no_grad():
        for conv in head.m:
            b = conv.bias.view(head.na, head.no)
            b[:, layout.obj] = obj
            b[:, layout.cls] = cls
    return model
