"""Tracking: person identities across video frames with ultralytics' ByteTrack / BoT-SORT, then smoothing.

`PoseTracker` is the per-frame step of `kapao track` and `kapao predict --track`: it feeds the person
boxes and scores of a frame's Poses to an ultralytics tracker (configured from its shipped YAML or
from the user's), maps the tracks it reports back to pose indices (`Poses.track_ids`), and then
smooths each tracked pose's keypoints with a One Euro filter kept per track (kapao.track.smooth). A
filter's state is dropped as soon as the tracker removes the track.

Association uses boxes only (IoU fused with the score, as the trackers do); adding keypoint
similarity (OKS) did not lower id switches on synthetic crossings (scripts/benchmark_tracking.py).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np
import torch

from kapao.cfg.settings import OneEuroSettings, read_yaml
from kapao.data.sources import Frame
from kapao.errors import ConfigError, KapaoError
from kapao.poses import Poses
from kapao.track.smooth import KeypointSmoother

try:  # imported before ultralytics.trackers: its matching module would pip-install lap at run time if missing
    import lap  # noqa: F401
except ImportError as e:  # lap is a declared dependency; tests/test_track.py hides it to check this
    raise KapaoError("tracking needs the 'lap' package, a kapao dependency: pip install 'lap>=0.5.12'") from e
from ultralytics.trackers.bot_sort import BOTSORT
from ultralytics.trackers.byte_tracker import BYTETracker

TRACKERS: dict[str, type[BYTETracker]] = {"bytetrack": BYTETracker, "botsort": BOTSORT}
UNTRACKED = -1  # track id of a pose that is in no confirmed track this frame (e.g. a track's first frame)
VIDEO_FPS_FALLBACK = 30.0  # frame rate assumed for image sequences and streams that report none


def tracker_yaml(name: str) -> Path:
    """The YAML that ships with ultralytics for a built-in tracker name."""
    import ultralytics

    return Path(ultralytics.__file__).parent / "cfg" / "trackers" / f"{name}.yaml"


def load_tracker_config(tracker: str | Path = "bytetrack") -> SimpleNamespace:
    """Tracker settings from a built-in name (bytetrack, botsort) or a YAML file.

    A user YAML names its `tracker_type` and sets any subset of that tracker's keys; the others come
    from the tracker's shipped YAML. ReID (`with_reid: true`) is refused: it needs a second network.
    """
    text = str(tracker)
    if text in TRACKERS:
        return SimpleNamespace(**read_yaml(tracker_yaml(text)))
    path = Path(text).expanduser()
    if path.suffix.lower() not in (".yaml", ".yml"):
        raise ConfigError(f"--tracker {text}: use {' or '.join(TRACKERS)}, or a tracker YAML file")
    if not path.is_file():
        raise ConfigError(f"--tracker {text}: no such file; use {' or '.join(TRACKERS)} or an existing YAML")
    cfg = read_yaml(path)
    kind = cfg.get("tracker_type")
    if kind not in TRACKERS:
        raise ConfigError(f"--tracker {path}: 'tracker_type' must be one of {', '.join(TRACKERS)}, got {kind!r}")
    merged = {**read_yaml(tracker_yaml(kind)), **cfg}
    if merged.get("with_reid"):
        raise ConfigError(f"--tracker {path}: 'with_reid: true' needs a ReID network, which kapao does not run; "
                          "set it to false")
    for key, low, high in (("track_high_thresh", 0, 1), ("track_low_thresh", 0, 1), ("new_track_thresh", 0, 1),
                           ("match_thresh", 0, 1), ("track_buffer", 0, float("inf"))):
        v = merged[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v <= high:
            raise ConfigError(f"--tracker {path}: '{key}' must be a number in [{low}, {high}], got {v!r}")
    return SimpleNamespace(**merged)


class TrackerInput:
    """Person detections of one frame in the form ultralytics' trackers read (as `Boxes.cpu().numpy()`).

    xyxy (N, 4) pixels, conf (N,), cls (N,) all 0 (person); `keypoints` (N, K, 2) rides along for
    association experiments. Boolean or index arrays select rows.
    """

    def __init__(self, xyxy: np.ndarray, conf: np.ndarray, keypoints: np.ndarray | None = None) -> None:
        self.xyxy = np.asarray(xyxy, np.float32).reshape(-1, 4)
        self.conf = np.asarray(conf, np.float32).reshape(-1)
        self.cls = np.zeros_like(self.conf)
        self.keypoints = keypoints

    @classmethod
    def from_poses(cls, poses: Poses) -> "TrackerInput":
        return cls(poses.boxes.detach().float().cpu().numpy(), poses.scores.detach().float().cpu().numpy(),
                   poses.keypoints[..., :2].detach().float().cpu().numpy())

    @property
    def xywh(self) -> np.ndarray:
        xy = (self.xyxy[:, :2] + self.xyxy[:, 2:]) / 2
        return np.concatenate([xy, self.xyxy[:, 2:] - self.xyxy[:, :2]], 1)

    def __len__(self) -> int:
        return len(self.conf)

    def __getitem__(self, index: Any) -> "TrackerInput":
        kp = None if self.keypoints is None else self.keypoints[index]
        return TrackerInput(self.xyxy[index], self.conf[index], kp)


def assign_track_ids(tracker: BYTETracker, dets: TrackerInput, image: np.ndarray | None = None) -> np.ndarray:
    """Run one tracker step; (N,) int64 track id of each detection, UNTRACKED where no confirmed track took it.

    The tracker reports rows [x1, y1, x2, y2, track_id, score, cls, idx] (idx: the detection's index).
    """
    ids = np.full(len(dets), UNTRACKED, np.int64)
    out = tracker.update(dets, image)
    if len(out):
        ids[out[:, -1].astype(np.int64)] = out[:, 4].astype(np.int64)
    return ids


class PoseTracker:
    """Per-frame transform Poses -> Poses with `track_ids` (and, when asked, smoothed keypoints).

    Feed the frames of ONE video or stream in order; `reset()` before another video.
    """

    def __init__(self, tracker: str | Path = "bytetrack", smooth: OneEuroSettings | None = None) -> None:
        self.config = load_tracker_config(tracker)
        self.tracker = TRACKERS[self.config.tracker_type](self.config)
        self.smoother = KeypointSmoother(smooth) if smooth is not None else None
        self.tracks_total = 0  # confirmed tracks over all sequences so far
        self._max_id = 0  # highest confirmed id of the current sequence (ids are confirmed in increasing order)
        self._sequence: str | None = None  # the video/stream (or image sequence) being tracked
        self._index = 0  # frames seen of the current sequence

    def reset(self) -> None:
        """Forget every track (before another video); ids start again at 1."""
        self.tracker.reset()
        if self.smoother is not None:
            self.smoother.reset()
        self._max_id = 0
        self._sequence, self._index = None, 0

    def update_frame(self, frame: Frame, poses: Poses) -> Poses:
        """Track the poses of one frame of a run (a per-frame transform of KAPAO.run): each video or stream
        is its own sequence (tracks restart when the path changes); images (frame index None) form one
        sequence in the order given. Time stamps are frame index / frame.fps (VIDEO_FPS_FALLBACK if None)."""
        key = frame.path if frame.frame is not None else "<images>"
        if key != self._sequence:
            self.reset()
            self._sequence = key
        index = frame.frame if frame.frame is not None else self._index
        self._index += 1
        return self(poses, index / (frame.fps or VIDEO_FPS_FALLBACK), frame.image)

    def alive_ids(self) -> set[int]:
        """Ids of the tracks the tracker still holds (tracked or lost, not removed)."""
        return {int(t.track_id) for t in (*self.tracker.tracked_stracks, *self.tracker.lost_stracks)}

    def __call__(self, poses: Poses, time: float, image: np.ndarray | None = None) -> Poses:
        """poses of one frame (original-image pixels) at `time` seconds into the video; image (H, W, 3) BGR
        is used by BoT-SORT's camera-motion compensation. Returns a new Poses; the input is not changed."""
        ids = assign_track_ids(self.tracker, TrackerInput.from_poses(poses), image)
        new = ids[ids > self._max_id]
        if len(new):
            self.tracks_total += len(new)
            self._max_id = int(new.max())
        keypoints = poses.keypoints
        if self.smoother is not None:
            alive = self.alive_ids()
            self.smoother.drop([i for i in self.smoother.track_ids if i not in alive])
            keypoints = self._smooth(poses, ids, time)
        return dataclasses.replace(poses, keypoints=keypoints, track_ids=torch.from_numpy(ids).to(poses.boxes.device))

    def _smooth(self, poses: Poses, ids: np.ndarray, time: float) -> torch.Tensor:
        tracked = np.flatnonzero(ids != UNTRACKED)
        if not len(tracked):
            return poses.keypoints
        kp = poses.keypoints.detach().cpu()
        boxes = poses.boxes.detach().float().cpu().numpy()[tracked]
        heights = boxes[:, 3] - boxes[:, 1]
        assert self.smoother is not None  # checked by the caller
        xy = self.smoother(ids[tracked], kp[tracked, :, :2].double().numpy(), time, heights)
        out = kp.clone()
        out[tracked, :, :2] = torch.from_numpy(xy).to(out.dtype)
        return out.to(poses.keypoints.device)


def id_switches(truth: Sequence[np.ndarray], predicted: Sequence[np.ndarray]) -> int:
    """Identity switches (CLEAR-MOT style) of a tracked sequence whose detections are known persons.

    truth[f], predicted[f]: (N_f,) ids of frame f's detections (true person, track id; UNTRACKED =
    none). A switch is counted each time a person's track id differs from the one it last had.
    """
    last: dict[int, int] = {}
    switches = 0
    for t_ids, p_ids in zip(truth, predicted):
        for person, track in zip(np.asarray(t_ids).tolist(), np.asarray(p_ids).tolist()):
            if track == UNTRACKED:
                continue
            if person in last and last[person] != track:
                switches += 1
            last[person] = track
    return switches

