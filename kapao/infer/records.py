"""The record format of a predict run: one JSON line per frame/image in ``predictions.jsonl`` and its
conversion to and from :class:`kapao.poses.Poses`, the names sources get in it, and the COCO-format
``predictions.json`` built from the JSONL file.

A frame record: ``{"source", "frame", "time", "image_id", "poses": [{"box", "score", "keypoints",
"confidences", "fused", "track_id"}, ...]}`` (see :func:`frame_record`, :func:`pose_records`); values are
the shortest decimals that read back as the same float32, so JSONL -> Poses -> JSONL is exact.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from kapao.data.sources import Frame, SourceSpec
from kapao.errors import DataError
from kapao.poses import Poses
from kapao.runtime import atomic_write

LOGGER = logging.getLogger(__name__)

PREDICTIONS_JSONL = "predictions.jsonl"
PREDICTIONS_JSON = "predictions.json"


def image_id_of(frame: Frame) -> int | str:
    """COCO-style id: the frame index for videos, the file stem (as int when numeric) for images."""
    if frame.frame is not None:
        return frame.frame
    stem = Path(frame.path).stem
    return int(stem) if stem.isdigit() else stem


def source_root(spec: SourceSpec) -> Path | None:
    """The folder JSONL source names are relative to: a folder SOURCE itself, else the deepest folder
    holding every item (a glob over several folders keeps their sub-paths apart); None for streams."""
    if spec.kind == "stream" or not spec.items:
        return None
    given = Path(spec.source).expanduser()
    if given.is_dir():
        return Path(os.path.abspath(given))
    return Path(os.path.commonpath([os.path.dirname(os.path.abspath(i)) for i in spec.items]))


def source_name(item: str, root: Path | None) -> str:
    """How an image/video/stream is named in the JSONL: its path relative to `root` (POSIX), or as given."""
    return item if root is None else Path(os.path.relpath(os.path.abspath(item), root)).as_posix()


# ----------------------------------------------------------------------------------------------
# The JSONL record of a frame

def _short(t: torch.Tensor) -> list[float]:
    """Flat values, each the shortest decimal that reads back as the same float32 (exact and compact)."""
    return [float(str(v)) for v in t.detach().float().cpu().numpy().ravel()]


def pose_records(poses: Poses) -> list[dict[str, Any]]:
    """One dict per pose: box [x1, y1, x2, y2], score, keypoints [[x, y]] * K, confidences [K], fused [K],
    track_id (int; None when not tracked or in no confirmed track); original-image pixels."""
    n, k = len(poses), poses.num_keypoints
    boxes, scores = _short(poses.boxes), _short(poses.scores)
    xy, conf = _short(poses.keypoints[..., :2]), _short(poses.keypoints[..., 2])
    assert poses.fused is not None  # Poses.__post_init__ sets it
    fused = poses.fused.cpu().tolist()
    ids = [None] * n if poses.track_ids is None else [int(i) if i >= 0 else None for i in poses.track_ids.tolist()]
    return [{"box": boxes[4 * i: 4 * i + 4], "score": scores[i],
             "keypoints": [xy[2 * (i * k + j): 2 * (i * k + j) + 2] for j in range(k)],
             "confidences": conf[i * k: (i + 1) * k], "fused": fused[i], "track_id": ids[i]} for i in range(n)]


def poses_from_records(records: Sequence[dict[str, Any]], num_keypoints: int) -> Poses:
    """The Poses (float32) a list of :func:`pose_records` dicts describes; exact for values they wrote."""
    if not records:
        return Poses.empty(num_keypoints)
    boxes = torch.tensor([r["box"] for r in records], dtype=torch.float32)
    xy = torch.tensor([r["keypoints"] for r in records], dtype=torch.float32).reshape(len(records), num_keypoints, 2)
    conf = torch.tensor([r["confidences"] for r in records], dtype=torch.float32)
    ids = [r.get("track_id") for r in records]
    return Poses(boxes, torch.tensor([r["score"] for r in records], dtype=torch.float32),
                 torch.cat((xy, conf[..., None]), -1), fused=torch.tensor([r["fused"] for r in records], dtype=torch.bool),
                 track_ids=None if all(i is None for i in ids) else
                 torch.tensor([-1 if i is None else i for i in ids], dtype=torch.int64))


def frame_record(frame: Frame, name: str, poses: Poses) -> dict[str, Any]:
    """The JSONL line of one frame: source, frame (None for images), time (s into a video), image_id, poses."""
    t = None if frame.frame is None or not frame.fps else round(frame.frame / frame.fps, 6)
    return {"source": name, "frame": frame.frame, "time": t, "image_id": image_id_of(frame), "poses": pose_records(poses)}


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """The frame records of a JSONL file, one at a time. An unfinished last line (no newline: a kill
    mid-write) is skipped; any other line that is not a JSON object raises DataError naming it."""
    with open(path, "rb") as f:
        for i, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                LOGGER.warning("%s: line %d is unfinished (the run was killed while writing it); ignored", path, i)
                return
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                rec = None
            if not isinstance(rec, dict) or "poses" not in rec or "source" not in rec:
                raise DataError(f"{path}: line {i} is not a kapao frame record; restore the file or start a new run "
                                "(drop --resume)")
            yield rec


def write_coco_json(jsonl: Path, out: Path, num_keypoints: int) -> Path:
    """COCO keypoint results of every record of `jsonl`, streamed into `out` (atomic): the same list
    ``Poses.to_coco`` gives, each result with ``file`` = the record's source name."""
    try:
        with atomic_write(out, "w") as f:
            f.write("[")
            sep = ""
            for rec in read_records(jsonl):
                for r, p in zip(poses_from_records(rec["poses"], num_keypoints).to_coco(rec["image_id"]), rec["poses"]):
                    r["file"] = rec["source"]
                    if p.get("track_id") is not None:
                        r["track_id"] = p["track_id"]
                    f.write(sep + json.dumps(r))
                    sep = ", "
            f.write("]")
    except OSError as e:
        raise DataError(f"cannot write {out}: {e.strerror or e}; free disk space or use --project with a "
                        "writable folder") from None
    return out
