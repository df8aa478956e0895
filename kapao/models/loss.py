"""KAPAO training loss: target assignment (YOLOv5 rule) and the box/objectness/class/keypoint terms.

Units: targets arrive normalised to the network input (:class:`~kapao.cfg.schema.TargetLayout`); the
assignment and every loss term work in grid units of each level (pixels / stride).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, cast

import torch
from torch import Tensor, nn
from ultralytics.utils.metrics import bbox_iou

from kapao.cfg.schema import OBJ_LEVEL_WEIGHTS, HeadLayout, TargetLayout
from kapao.cfg.settings import Hyp
from kapao.errors import ConfigError
from kapao.models.network import KapaoModel

# A target is assigned to its own cell and to the neighbouring cell across the nearer vertical and
# horizontal cell edge: offsets (in cells, subtracted from the centre) own, left, up, right, down.
_NEIGHBOUR_OFFSETS = ((0.0, 0.0), (0.5, 0.0), (0.0, 0.5), (-0.5, 0.0), (0.0, -0.5))


@dataclass
class LevelTargets:
    """Positive samples of one output level, n rows (one per target x anchor x cell).

    image, anchor, gj, gi: (n,) long indices into the level's (B, na, H, W) predictions
    cls:        (n,) long class (0 = pose object, k + 1 = keypoint object of keypoint k)
    box:        (n, 4) cx, cy relative to the cell's top-left corner, w, h; grid units
    keypoints:  (n, K, 3) x, y relative to the cell's top-left corner in grid units, visibility
    anchor_wh:  (n, 2) the matched anchor's w, h in grid units
    """

    image: Tensor
    anchor: Tensor
    gj: Tensor
    gi: Tensor
    cls: Tensor
    box: Tensor
    keypoints: Tensor
    anchor_wh: Tensor

    def __len__(self) -> int:
        return self.image.shape[0]


def assign_targets(targets: Tensor, grid_shapes: Sequence[tuple[int, int]], anchors: Tensor,
                  num_keypoints: int, anchor_t: float = 4.0) -> list[LevelTargets]:
    """Assign targets to anchors and cells of every level (the YOLOv5 rule, as KAPAO trains).

    targets:     (M, 6 + 3K) rows of :class:`TargetLayout`, coordinates normalised to the input (0..1)
    grid_shapes: (H_i, W_i) of each level's grid
    anchors:     (nl, na, 2) anchor w, h in grid units of each level (pixels / stride)

    A target matches an anchor when max(w/aw, aw/w, h/ah, ah/h) < anchor_t. Each match goes to the
    cell holding its centre and, per axis, to the neighbouring cell across the nearer edge when the
    centre lies within half a cell of it (fractional part < 0.5 measured from that edge) and more than
    one cell from the image border. A centre exactly on a cell edge therefore counts for the cells on
    both sides (and the own cell twice), as in the official implementation. Indices are clamped to the
    grid; box and keypoint offsets are taken relative to the unclamped cell.
    """
    tl = TargetLayout(num_keypoints)
    if targets.ndim != 2 or targets.shape[1] != tl.width:
        raise ValueError(f"targets must be (M, {tl.width}) for K={num_keypoints}, got {tuple(targets.shape)}")
    if anchors.ndim != 3 or anchors.shape[0] != len(grid_shapes) or anchors.shape[-1] != 2:
        raise ValueError(f"anchors must be (nl={len(grid_shapes)}, na, 2), got {tuple(anchors.shape)}")
    device, dtype = targets.device, targets.dtype
    na, nt = anchors.shape[1], targets.shape[0]
    xy = slice(tl.box.start, tl.box.start + 2)
    wh = slice(tl.box.start + 2, tl.box.stop)
    kx = torch.arange(num_keypoints, device=device) * 3 + tl.kpt.start  # keypoint x columns
    offsets = torch.tensor(_NEIGHBOUR_OFFSETS, device=device, dtype=dtype)  # (5, 2)
    anchor_idx = torch.arange(na, device=device).view(na, 1).expand(na, nt)

    levels = []
    for i, (ny, nx) in enumerate(grid_shapes):
        gain = torch.ones(tl.width, device=device, dtype=dtype)
        gain[[xy.start, wh.start]] = nx
        gain[[xy.start + 1, wh.start + 1]] = ny
        gain[kx], gain[kx + 1] = nx, ny
        t = targets * gain  # (nt, W) grid units

        # anchors: w/h ratio within anchor_t
        anc = anchors[i].to(dtype)
        r = t[None, :, wh] / anc[:, None, :]  # (na, nt, 2)
        match = torch.maximum(r, 1 / r).amax(-1) < anchor_t
        t = t.unsqueeze(0).expand(na, nt, tl.width)[match]  # (m, W)
        a = anchor_idx[match]

        # cells: own + nearest horizontal and vertical neighbours
        gxy = t[:, xy]
        gxy_inv = torch.tensor([nx, ny], device=device, dtype=dtype) - gxy
        near_low = (gxy % 1 < 0.5) & (gxy > 1)  # left, up
        near_high = (gxy_inv % 1 < 0.5) & (gxy_inv > 1)  # right, down
        use = torch.cat((torch.ones_like(near_low[:, :1]), near_low, near_high), 1).T  # (5, m)
        t = t.unsqueeze(0).expand(5, *t.shape)[use]
        a = a.unsqueeze(0).expand(5, -1)[use]
        off = offsets[:, None, :].expand(5, use.shape[1], 2)[use]
        gij = (t[:, xy] - off).long()

        kp = t[:, tl.kpt].reshape(-1, num_keypoints, 3).clone()
        kp[..., :2] -= gij[:, None, :]
        levels.append(LevelTargets(
            image=t[:, tl.image].long(),
            anchor=a,
            gj=gij[:, 1].clamp(0, ny - 1),
            gi=gij[:, 0].clamp(0, nx - 1),
            cls=t[:, tl.cls].long(),
            box=torch.cat((t[:, xy] - gij, t[:, wh]), 1),
            keypoints=kp,
            anchor_wh=anc[a],
        ))
    return levels


@dataclass(frozen=True)
class LossGains:
    """Loss-term weights as training applies them (Hyp gains scaled to levels, classes and image size)."""

    box: float
    obj: float
    cls: float
    kp: float

    @classmethod
    def from_hyp(cls, hyp: Hyp, num_classes: int, imgsz: int, num_levels: int = 4) -> "LossGains":
        per_level = 3.0 / num_levels
        return cls(box=hyp.box * per_level,
                   obj=hyp.obj * (imgsz / 640) ** 2 * per_level,
                   cls=hyp.cls * num_classes / 80 * per_level,
                   kp=hyp.kp * per_level)


class KapaoLoss:
    """``loss(raw, targets) -> (total * batch_size, components [box, obj, cls, kp] detached)``.

    model:  a :class:`~kapao.models.network.KapaoModel` (or a wrapper with ``.module``); anchors, strides and
            the head layout are read from it.
    raw:    the training forward output, per level (B, na, H, W, no) logits
    targets: (M, 6 + 3K) :class:`TargetLayout` rows, normalised to the input size

    box: mean(1 - CIoU) over positives; obj: BCE over all anchors against the detached CIoU clamped
    at 0, weighted per level by OBJ_LEVEL_WEIGHTS; cls: BCE of the 1 + K classes on positives
    (one-hot); kp: mean L2 distance in grid units over visible keypoints of positive pose objects.
    Each term is summed over levels and multiplied by its :class:`LossGains`.
    """

    def __init__(self, model: nn.Module, hyp: Hyp | None = None, imgsz: int = 640):
        net = cast(KapaoModel, getattr(model, "module", model))  # the network itself, also under DDP
        self.layout: HeadLayout = net.layout
        self.strides = tuple(net.strides)
        anchors_px = net.anchors.detach()
        stride_t = torch.tensor(self.strides, dtype=anchors_px.dtype, device=anchors_px.device).view(-1, 1, 1)
        self.anchors = anchors_px / stride_t  # (nl, na, 2) grid units
        if len(OBJ_LEVEL_WEIGHTS) < len(self.strides):
            raise ConfigError(f"no objectness weights for {len(self.strides)} levels")
        self.obj_weights = OBJ_LEVEL_WEIGHTS[:len(self.strides)]
        self.hyp = hyp or Hyp()
        self.gains = LossGains.from_hyp(self.hyp, self.layout.num_classes, imgsz, len(self.strides))
        self.bce = nn.BCEWithLogitsLoss()

    def __call__(self, raw: Sequence[Tensor], targets: Tensor) -> tuple[Tensor, Tensor]:
        if len(raw) != len(self.strides):
            raise ValueError(f"expected {len(self.strides)} prediction levels, got {len(raw)}")
        lay, k = self.layout, self.layout.num_keypoints
        device = raw[0].device
        anchors = self.anchors.to(device)
        levels = assign_targets(targets.to(device), [(p.shape[2], p.shape[3]) for p in raw], anchors, k, self.hyp.anchor_t)
        zero = torch.zeros((), device=device)
        lbox, lobj, lcls, lkp = zero, zero, zero, zero

        for p, tg, w in zip(raw, levels, self.obj_weights):
            tobj = torch.zeros_like(p[..., lay.obj])
            n = len(tg)
            if n:
                ps = p[tg.image, tg.anchor, tg.gj, tg.gi]  # (n, no)
                pbox = ps[:, lay.box].sigmoid()
                pbox = torch.cat((pbox[:, :2] * 2 - 0.5, (pbox[:, 2:] * 2) ** 2 * tg.anchor_wh), 1)
                iou = bbox_iou(pbox, tg.box, xywh=True, CIoU=True).squeeze(-1)  # (n,)
                lbox = lbox + (1.0 - iou).mean()

                vis = tg.keypoints[..., 2] > 0  # (n, K)
                if vis.any():
                    pkp = (ps[:, lay.kpt].view(n, k, 2).sigmoid() * 4 - 2) * tg.anchor_wh[:, None, :]
                    lkp = lkp + torch.linalg.norm(pkp[vis] - tg.keypoints[..., :2][vis], dim=-1).mean()

                tobj[tg.image, tg.anchor, tg.gj, tg.gi] = iou.detach().clamp(0).to(tobj.dtype)

                pcls = ps[:, lay.cls]
                onehot = torch.zeros_like(pcls)
                onehot[torch.arange(n, device=device), tg.cls] = 1.0
                lcls = lcls + self.bce(pcls, onehot)

            lobj = lobj + self.bce(p[..., lay.obj], tobj) * w

        g = self.gains
        lbox, lobj, lcls, lkp = lbox * g.box, lobj * g.obj, lcls * g.cls, lkp * g.kp
        batch_size = raw[0].shape[0]
        total = (lbox + lobj + lcls + lkp) * batch_size
        return total, torch.stack((lbox, lobj, lcls, lkp)).detach()
