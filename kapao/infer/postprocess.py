"""From raw network output to poses: NMS, keypoint-object fusion, per-keypoint confidence, TTA merging.

The result type, :class:`kapao.poses.Poses`, is importable from here too.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from kapao.cfg.schema import HeadLayout
from kapao.cfg.settings import InferenceSettings
from kapao.infer.nms import (
    MAX_NMS,
    check_pred,
    nms,
    top_candidates,
)
from kapao.poses import Poses

# ----------------------------------------------------------------------------------------------
# From decoded network output to poses: NMS -> map to original pixels -> keypoint-object fusion.
#
# Behaviour of the official implementation (wmcnally/kapao: utils/general.py non_max_suppression_kp,
# val.py run_nms/post_process_batch, models/yolo.py _descale_pred) that this module follows:
#   * score = objectness x class probability. Every anchor contributes ONE class, its argmax over all
#     1 + K class scores; it is a person candidate when that class is 0, its score > conf and its
#     objectness > conf, and a keypoint-object candidate of keypoint k when the argmax is class k + 1,
#     its score > conf_kp and its objectness > conf_kp. (An anchor whose keypoint class beats its
#     person class is never a person, whatever its person score.)
#   * Per image, at most 30 000 highest-scoring candidates enter NMS; persons and keypoint objects
#     are suppressed separately (IoU iou / iou_kp), per class; max_det is kept per image for persons
#     and for all keypoint objects together.
#   * Fusion: poses whose score > conf_kp_person take part; keypoint objects are taken in descending
#     score; each one goes to the taking-part pose whose keypoint of its type is nearest (first pose
#     on a tie) in original-image pixels, against the keypoints as updated so far, and overwrites it
#     when the distance < tolerance and its score > the keypoint's stored confidence.
#   * Every keypoint that was not fused -- all keypoints of poses at or below conf_kp_person, and the
#     unfused keypoints of the others -- keeps its regressed position with confidence 0.
# Deliberate differences: per-class NMS through torchvision batched_nms (the official shifts classes
# by 4096 px, which lets classes meet for boxes beyond that); always two NMS calls (the official
# run_nms merges them when iou == iou_kp and conf_kp >= conf -- never with the shipped defaults --
# which shares max_det between persons and keypoints and keeps keypoint scores >= conf_kp); all
# keypoints are clipped to the image (the official clipping reaches only the first two); boxes are
# not rounded; equal keypoint-object scores are taken in input order; distances are compared squared;
# NMS stops once max_det boxes are kept and returns exactly equal scores in input order (batched_nms_top).
# Deliberate addition (positions, fused confidences and person scores are exactly the official ones):
# a keypoint that was NOT fused gets a confidence instead of 0 -- the best keypoint-class evidence of
# its type within the fusion tolerance: max over anchors of objectness x p(class k + 1) (whatever the
# anchor's argmax class, before any NMS, counted only above KP_EVIDENCE_FLOOR for both factors) whose
# box centre lies at distance < tolerance from the keypoint, 0 if there is none (keypoint_confidence).
# Of more than MAX_NMS such anchor rows per image only the MAX_NMS highest count, exactly equal scores at
# the cut in (anchor, type) order (torch.topk's pick among equal scores depends on the device).
# Poses.fused keeps the official distinction: True exactly where the official rule gives confidence > 0.
# OKS-based metrics ignore keypoint scores, so COCO/CrowdPose AP do not change.

KP_EVIDENCE_FLOOR = 0.01  # keypoint-class scores (and objectness) at or below this are no evidence
_EVIDENCE_CHUNK = 1 << 22  # (keypoint, evidence) pairs per step of keypoint_confidence (bounds memory)


# (orig_shape (h, w), ratio float | (rw, rh), pad (padw, padh)) of one image, as letterbox gives them
ImageMeta = tuple[tuple[int, int], float | tuple[float, float], tuple[float, float]]


def scale_to_original(coords: Tensor, ratio: float | Sequence[float], pad: Sequence[float],
                      orig_shape: Sequence[int], clip: bool = True) -> Tensor:
    """Map coordinates from the letterboxed network input back to original-image pixels.

    coords: (..., 2P) x, y pairs in network-input pixels -- boxes (n, 4) x1, y1, x2, y2, keypoints
    (n, K, 2) or flat (n, 2K). ratio: the letterbox resize factor, a float or (rw, rh); pad: (padw,
    padh) added on the left/top; orig_shape: (h, w). With `clip`, x is clipped to [0, w] and y to
    [0, h] (boxes and keypoints alike). Returns a new tensor of the same shape; input not modified.
    """
    if coords.shape[-1] % 2:
        raise ValueError(f"coordinates must be x, y pairs along the last dim, got shape {tuple(coords.shape)}")
    rw, rh = (float(ratio), float(ratio)) if isinstance(ratio, (int, float)) else (float(ratio[0]), float(ratio[1]))
    padw, padh = float(pad[0]), float(pad[1])
    h, w = orig_shape[0], orig_shape[1]
    pts = coords.reshape(*coords.shape[:-1], coords.shape[-1] // 2, 2)
    x = (pts[..., 0] - padw) / rw
    y = (pts[..., 1] - padh) / rh
    if clip:
        x, y = x.clamp(0, w), y.clamp(0, h)
    return torch.stack((x, y), -1).reshape(coords.shape)


def _parse_meta(meta: ImageMeta | Mapping[str, Any]) -> tuple[tuple[int, int], Any, Any]:
    """(orig_shape, ratio, pad) from a tuple or a mapping with those keys (extra keys are ignored)."""
    try:
        shape, ratio, pad = (meta["orig_shape"], meta["ratio"], meta["pad"]) if isinstance(meta, Mapping) else meta
        h, w = shape
        _ = pad[0], pad[1]
        _ = ratio if isinstance(ratio, (int, float)) else (ratio[0], ratio[1])
    except (TypeError, ValueError, IndexError, KeyError):
        raise ValueError("image meta must be (orig_shape (h, w), ratio or (rw, rh), pad (padw, padh)) or a mapping "
                         f"with those keys, got {meta!r}") from None
    return (int(h), int(w)), ratio, pad


def _sq_dist(a: Tensor, b: Tensor) -> Tensor:
    """Squared Euclidean distance of (..., 2) points, broadcast."""
    dx = a[..., 0] - b[..., 0]
    dy = a[..., 1] - b[..., 1]
    return dx * dx + dy * dy


def fuse_keypoints(boxes: Tensor, scores: Tensor, keypoints_xy: Tensor, kp_objects: Tensor,
                   settings: InferenceSettings) -> Tensor:
    """Overwrite pose keypoints with keypoint-object detections (the official fusion rule, exactly).

    boxes (N, 4), scores (N,), keypoints_xy (N, K, 2): poses; kp_objects (M, 6): x1, y1, x2, y2,
    score, keypoint index 0..K-1 -- all in original-image pixels (settings.tolerance is in those).
    `boxes` only fixes N; the rule does not use them. Returns (N, K, 3) x, y, confidence: a fused
    keypoint has its object's box centre and score, every other keypoint its regressed position and
    confidence 0. Inputs are not modified.

    The rule is sequential (objects in descending score, each matched against the keypoints as
    updated so far); it is evaluated exactly with tensor ops by fixed-point iteration:
      * Each object's decision (target pose, accept or not) depends only on the decisions of the
        objects before it: the state it sees has, for each pose slot (pose, type), the regressed
        keypoint unless an earlier object of that type was accepted there, in which case the
        keypoint sits at that object's centre with that object's score.
      * One iteration recomputes every object's decision from the previous iteration's decisions
        of the objects before it. After t iterations the first t objects are right (induction:
        object t only reads objects < t), so at most M + 1 iterations reach a fixed point, and a
        fixed point is the sequential result (induction again). The loop stops at the first
        iteration that changes nothing -- usually after 1-3, since only objects competing for the
        same keypoint depend on each other.
      * Because objects come in descending score, a slot once overwritten (confidence s) is never
        overwritten again (later scores are <= s, and the rule needs score > confidence); so at a
        fixed point each slot has at most one accepted object, and "the earliest accepted object
        of the slot" describes the state every later object sees.
    Cost per iteration O(M (N + M)); every pose type is handled in the same iteration.
    """
    n, k = keypoints_xy.shape[0], keypoints_xy.shape[1] if keypoints_xy.ndim > 1 else 0
    if keypoints_xy.ndim != 3 or keypoints_xy.shape[2] != 2 or boxes.shape[0] != n or scores.shape != (n,):
        raise ValueError(f"fuse_keypoints: boxes {tuple(boxes.shape)}, scores {tuple(scores.shape)} and "
                         f"keypoints {tuple(keypoints_xy.shape)} must be (N, 4), (N,), (N, K, 2)")
    if kp_objects.ndim != 2 or kp_objects.shape[1] != 6:
        raise ValueError(f"fuse_keypoints: kp_objects must be (M, 6), got {tuple(kp_objects.shape)}")
    fused = torch.cat((keypoints_xy, keypoints_xy.new_zeros(n, k, 1)), -1)
    m = kp_objects.shape[0]
    if n == 0 or m == 0:
        return fused
    device = keypoints_xy.device
    work = torch.promote_types(keypoints_xy.dtype, torch.float32)  # half precision overflows d^2
    order = torch.sort(kp_objects[:, 4], descending=True, stable=True).indices
    objs = kp_objects[order].to(work)
    keypoints_xy = keypoints_xy.to(work)
    s, t = objs[:, 4], objs[:, 5].long()
    q = torch.stack(((objs[:, 0] + objs[:, 2]) / 2, (objs[:, 1] + objs[:, 3]) / 2), -1)  # (M, 2) centres
    taking_part = scores > settings.conf_kp_person  # (N,)
    inf = torch.tensor(float("inf"), dtype=work, device=device)
    d_regressed = _sq_dist(q[:, None], keypoints_xy[:, t].transpose(0, 1))  # (M, N): to regressed keypoints
    d_objects = _sq_dist(q[:, None], q[None])  # (M, M): to other objects' centres
    tol2 = float(settings.tolerance) * float(settings.tolerance)
    idx = torch.arange(m, device=device)
    none = torch.full((k * n,), m, dtype=torch.long, device=device)
    accepted = torch.zeros(m, dtype=torch.bool, device=device)
    target = torch.zeros(m, dtype=torch.long, device=device)
    for _ in range(m + 1):
        # first accepted object of every (type, pose) slot, M if none; then each object's view of it
        holder_of_slot = none.scatter_reduce(0, t * n + target, torch.where(accepted, idx, m), "amin")
        holder = holder_of_slot.view(k, n)[t]  # (M, N)
        moved = holder < idx[:, None]  # the slot was overwritten by an earlier object
        safe = holder.clamp(max=m - 1)
        d = torch.where(moved, d_objects.gather(1, safe), d_regressed)
        d = torch.where(taking_part, d, inf)
        new_target = d.argmin(1)  # first pose on a tie, as the official np.argmin
        d_min = d.gather(1, new_target[:, None]).squeeze(1)
        was_moved = moved.gather(1, new_target[:, None]).squeeze(1)
        stored_conf = torch.where(was_moved, s[safe.gather(1, new_target[:, None]).squeeze(1)], 0.0)
        new_accepted = (s > stored_conf) & (d_min < tol2)
        new_target = torch.where(new_accepted, new_target, 0)
        if torch.equal(new_accepted, accepted) and torch.equal(new_target, target):
            break
        accepted, target = new_accepted, new_target
    # write accepted objects into their slots; rejected ones go to a spare row that is dropped
    rows = torch.where(accepted, target * k + t, n * k)
    flat = torch.cat((fused.reshape(n * k, 3), fused.new_zeros(1, 3)))
    flat = flat.index_put((rows,), torch.cat((q, s[:, None]), 1).to(fused.dtype))
    return flat[: n * k].reshape(n, k, 3)


def keypoint_evidence(pred: Tensor, layout: HeadLayout, floor: float = KP_EVIDENCE_FLOOR) -> list[Tensor]:
    """Keypoint-class evidence of every anchor, image by image, before any NMS.

    pred: (B, N, layout.num_outputs) decoded predictions (see `nms`), network-input pixels.
    Returns per image a (P, 4) tensor: box centre x, y | score = objectness x p(class k + 1) |
    keypoint index k, one row per (anchor, keypoint type) whose objectness and score both exceed
    `floor`, in (anchor, type) order; when more than MAX_NMS rows pass, only the MAX_NMS highest scores
    (`top_candidates`: exactly equal scores at the cut in (anchor, type) order). Rows of TTA passes
    merged by `merge_tta` are already mapped back, so TTA needs nothing more.
    """
    check_pred(pred, layout)
    k = layout.num_keypoints
    obj = pred[..., layout.obj]
    kp_scores = pred[..., layout.cls][..., 1:] * obj.unsqueeze(-1)  # (B, N, K)
    passing = (kp_scores > floor) & (obj > floor).unsqueeze(-1)
    out = []
    for i in range(pred.shape[0]):
        scores = kp_scores[i].flatten()
        if int(torch.count_nonzero(passing[i])) > MAX_NMS:  # passing scores are > floor > -inf: the top are passing
            cell = top_candidates(torch.where(passing[i].flatten(), scores, float("-inf")), MAX_NMS)
        else:
            cell = passing[i].flatten().nonzero().squeeze(1)
        anchor, kind = cell // k, cell % k
        out.append(torch.cat((pred[i, anchor, :2], scores[cell, None], kind[:, None].to(pred.dtype)), 1))
    return out


def keypoint_confidence(keypoints_xy: Tensor, evidence: Tensor, tolerance: float,
                        wanted: Tensor | None = None) -> Tensor:
    """Confidence of every keypoint from the evidence around it.

    keypoints_xy (N, K, 2) and evidence (P, 4) centre x, y, score, keypoint index (from
    `keypoint_evidence`, mapped to the same pixels), tolerance in those pixels. Returns (N, K): for
    keypoint k of pose n the largest evidence score of type k whose centre lies at distance
    < tolerance (the fusion rule's test, on squared distances in float32 or wider), 0 where there is none.
    wanted: optional (N, K) bool, the keypoints to compute (0 elsewhere; postprocess skips the fused ones).

    Only nearby pairs are compared: evidence is bucketed on a grid of cells a little wider than the
    tolerance, sorted by (type, cell row, cell column), and each keypoint reads the three runs of its
    type's rows above, at and below its cell, three cells wide (a binary search each). Every pair that
    passes the distance test lies in neighbouring cells, so the maxima equal those of comparing all
    N x K x P pairs; the cost is the number of nearby pairs, taken in steps of at most _EVIDENCE_CHUNK.
    """
    n, k = keypoints_xy.shape[:2]
    work = torch.promote_types(keypoints_xy.dtype, torch.float32)  # half precision overflows d^2
    conf = torch.zeros(n * k, dtype=work, device=keypoints_xy.device)
    kxy = keypoints_xy.to(work).reshape(n * k, 2)
    ev = evidence.to(work)
    finite = torch.isfinite(ev[:, :2]).all(1)
    if not bool(finite.all()):
        ev = ev[finite]  # a non-finite centre is never within the tolerance
    valid = torch.isfinite(kxy).all(1)
    if wanted is not None:
        valid &= wanted.reshape(n * k)
    query = valid.nonzero().squeeze(1)  # (Q,) flat keypoint slots n * K + k
    if query.numel() == 0 or ev.shape[0] == 0 or not tolerance > 0:
        return conf.view(n, k).to(keypoints_xy.dtype)
    pts = torch.cat((kxy[query], ev[:, :2])).double()  # float64: rounding cannot move a point by a cell
    origin = pts.min(0).values
    span = float((pts.max(0).values - origin).max())
    cell = max(float(tolerance) * (1 + 1e-3), span / 2**20)  # wider than any accepted |dx|, |dy|; bounded grid
    width = int(span / cell) + 4
    # grid cell (column, row) of every point, plus 1 so that each point's left/upper neighbour cell is >= 0
    qcell, ecell = (torch.floor((pts - origin) / cell).long() + 1).split((query.numel(), ev.shape[0]))
    ekey = (ev[:, 3].long() * width + ecell[:, 1]) * width + ecell[:, 0]
    ekey, order = torch.sort(ekey)
    ev = ev[order]
    row = ((query % k) * width + qcell[:, 1])[:, None] + torch.tensor([-1, 0, 1], device=query.device)
    left = row * width + qcell[:, 0, None]  # (Q, 3) key of the middle cell of each neighbour row
    lo = torch.searchsorted(ekey, left - 1).flatten()
    count = torch.searchsorted(ekey, left + 1, right=True).flatten() - lo
    slot = query.repeat_interleave(3)
    ends = count.cumsum(0)
    tol2 = float(tolerance) * float(tolerance)
    start = 0
    while start < count.numel():
        before = ends[start] - count[start]  # pairs of the runs before this step
        stop = max(start + 1, int(torch.searchsorted(ends, before + _EVIDENCE_CHUNK, right=True)))
        c = count[start:stop]
        pair_run = torch.repeat_interleave(c)  # run (within this step) of every pair
        first = ends[start:stop] - c - before
        e = lo[start:stop][pair_run] + torch.arange(int(c.sum()), device=c.device) - first[pair_run]
        q = slot[start:stop][pair_run]
        d = _sq_dist(kxy[q], ev[e, :2])
        conf = conf.scatter_reduce(0, q, torch.where(d < tol2, ev[e, 2], 0.0), "amax")
        start = stop
    return conf.view(n, k).to(keypoints_xy.dtype)


def postprocess(pred: Tensor, settings: InferenceSettings, layout: HeadLayout,
                metas: Sequence[ImageMeta | Mapping[str, Any] | None] | None = None,
                return_kp_objects: bool = False) -> list[Poses]:
    """Decoded predictions -> one :class:`Poses` per image, in original-image pixels.

    pred: (B, N, layout.num_outputs) decoded network output in network-input pixels (see `nms`).
    metas: per image (orig_shape (h, w), ratio float | (rw, rh), pad (padw, padh)) as letterbox
    gives them, as a tuple or a mapping with keys orig_shape, ratio, pad (other keys ignored);
    None (or a None entry) keeps network-input pixels without clipping.
    Steps: nms -> scale_to_original (clipped) -> fuse_keypoints when settings.fuse (the tolerance is
    in original pixels, so fusion runs after the mapping) -> a confidence for every keypoint that
    was not fused (`keypoint_confidence` over `keypoint_evidence`, same tolerance); Poses.fused
    marks the fused ones. Keypoint objects (M, 6) in original pixels are attached as
    Poses.kp_objects when return_kp_objects.
    """
    dets = nms(pred, settings, layout)
    if metas is not None and len(metas) != len(dets):
        raise ValueError(f"postprocess: {len(metas)} image metas for a batch of {len(dets)}")
    with_poses = [i for i, d in enumerate(dets) if len(d.scores)]  # evidence only where it can be used
    busy = pred if len(with_poses) == len(dets) else pred[with_poses]  # copy only when some images are skipped
    evidence = dict(zip(with_poses, keypoint_evidence(busy, layout))) if with_poses else {}
    out = []
    for i, d in enumerate(dets):
        meta = None if metas is None else metas[i]
        boxes, kxy, kpo, ev = d.boxes, d.keypoints, d.kp_objects, evidence.get(i, pred.new_zeros(0, 4))
        if meta is not None:
            shape, ratio, pad = _parse_meta(meta)
            boxes = scale_to_original(boxes, ratio, pad, shape)
            kxy = scale_to_original(kxy, ratio, pad, shape)
            kpo = torch.cat((scale_to_original(kpo[:, :4], ratio, pad, shape), kpo[:, 4:]), 1)
            ev = torch.cat((scale_to_original(ev[:, :2], ratio, pad, shape), ev[:, 2:]), 1)
        if settings.fuse:
            keypoints = fuse_keypoints(boxes, d.scores, kxy, kpo, settings)
        else:
            keypoints = torch.cat((kxy, kxy.new_zeros(*kxy.shape[:2], 1)), -1)
        fused = keypoints[..., 2] > 0  # the official rule gives exactly the fused keypoints a confidence > 0
        conf = torch.where(fused, keypoints[..., 2], keypoint_confidence(kxy, ev, settings.tolerance, ~fused))
        keypoints = torch.cat((keypoints[..., :2], conf[..., None]), -1)
        out.append(Poses(boxes, d.scores, keypoints, kpo if return_kp_objects else None, fused))
    return out
