"""Steady keypoints: a One Euro filter (Casiez, Roussel, Vogel, CHI 2012) per track and keypoint.

The filter is a first-order low-pass whose cutoff frequency rises with the (filtered) speed: slow
keypoints are smoothed hard (jitter removed), fast ones little (no lag on a quick move). Written here
(~40 lines) rather than taken from a package because it runs vectorised over all tracks x keypoints of
a frame in one numpy expression, with state kept per track id and dropped when the track ends.

Speeds are measured in *person heights per second* (pixels / the track's box height), so one
setting works for near and far people and for any video resolution.
"""
from __future__ import annotations

import math

import numpy as np

from kapao.cfg.settings import OneEuroSettings

__all__ = ["KeypointSmoother", "OneEuroSettings"]


def _alpha(cutoff: np.ndarray | float, dt: np.ndarray) -> np.ndarray:
    """Smoothing factor of an exponential low-pass with `cutoff` Hz for steps of `dt` seconds."""
    tau = 1.0 / (2 * math.pi * np.asarray(cutoff))
    return 1.0 / (1.0 + tau / dt)


class KeypointSmoother:
    """One Euro filter over the keypoint positions of many tracks; state per track id.

    A track seen for the first time (or again after `drop`) starts from its raw keypoints. Time stamps
    are seconds (e.g. frame index / fps), so a track that was occluded for a few frames comes back with
    a larger step and follows its new position quickly.
    """

    def __init__(self, settings: OneEuroSettings | None = None) -> None:
        self.settings = settings or OneEuroSettings()
        self._state: dict[int, tuple[np.ndarray, np.ndarray, float]] = {}  # id -> (x (K, 2), dx (K, 2), t)

    def __len__(self) -> int:
        return len(self._state)

    @property
    def track_ids(self) -> list[int]:
        return list(self._state)

    def __call__(self, track_ids: np.ndarray, keypoints: np.ndarray, t: float, scale: np.ndarray) -> np.ndarray:
        """Filtered positions (T, K, 2) for raw `keypoints` (T, K, 2) pixels of tracks `track_ids` (T,) at
        time `t` seconds; `scale` (T,) pixels per person height (box height). Ids must be distinct; a
        track whose last time stamp is not before `t` restarts from its raw keypoints."""
        s = self.settings
        out = np.asarray(keypoints, np.float64).copy()
        known = np.array([i in self._state and self._state[i][2] < t for i in track_ids.tolist()], bool)
        if known.any():
            ids = track_ids[known].tolist()
            x_prev = np.stack([self._state[i][0] for i in ids])
            dx_prev = np.stack([self._state[i][1] for i in ids])
            dt = (t - np.array([self._state[i][2] for i in ids]))[:, None, None]
            x = out[known]
            dx = dx_prev + _alpha(s.d_cutoff, dt) * ((x - x_prev) / dt - dx_prev)
            speed = np.linalg.norm(dx, axis=-1, keepdims=True) / np.maximum(scale[known], 1.0)[:, None, None]
            x = x_prev + _alpha(s.min_cutoff + s.beta * speed, dt) * (x - x_prev)
            out[known] = x
            for j, i in enumerate(ids):
                self._state[i] = (x[j], dx[j], t)
        for i, x in zip(track_ids[~known].tolist(), out[~known]):
            self._state[i] = (x, np.zeros_like(x), t)
        return out

    def drop(self, track_ids: list[int] | np.ndarray) -> None:
        """Forget the state of ended tracks."""
        for i in np.asarray(track_ids).tolist():
            self._state.pop(int(i), None)

    def reset(self) -> None:
        self._state.clear()
