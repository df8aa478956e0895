"""One Euro keypoint smoothing: equals a textbook scalar filter, keeps state per track, drops it on request."""
from __future__ import annotations

import math

import numpy as np
import pytest

from kapao.cfg.settings import OneEuroSettings
from kapao.errors import ConfigError
from kapao.track.smooth import KeypointSmoother


def reference_one_euro(xs: np.ndarray, ts: np.ndarray, scale: float, s: OneEuroSettings) -> np.ndarray:
    """Textbook One Euro filter, one 2-D point, plain Python loop (speed = |velocity| / scale)."""

    def alpha(cutoff: float, dt: float) -> float:
        r = 2 * math.pi * cutoff * dt
        return r / (r + 1)

    out = [xs[0].copy()]
    dx = np.zeros(2)
    for k in range(1, len(xs)):
        dt = ts[k] - ts[k - 1]
        dx = dx + alpha(s.d_cutoff, dt) * ((xs[k] - out[-1]) / dt - dx)
        cutoff = s.min_cutoff + s.beta * float(np.hypot(*dx)) / scale
        out.append(out[-1] + alpha(cutoff, dt) * (xs[k] - out[-1]))
    return np.array(out)


def run(smoother: KeypointSmoother, ids: list[int], seq: np.ndarray, ts: np.ndarray, scale: float) -> np.ndarray:
    """seq (F, T, K, 2) -> filtered (F, T, K, 2)."""
    return np.stack([smoother(np.array(ids), seq[f], float(ts[f]), np.full(len(ids), scale)) for f in range(len(seq))])


@pytest.mark.parametrize("beta", [0.0, 0.7, 5.0])
def test_matches_scalar_reference_for_every_track_and_keypoint(beta: float):
    rng = np.random.default_rng(0)
    s = OneEuroSettings(min_cutoff=1.3, beta=beta, d_cutoff=1.0)
    ts = np.cumsum(rng.uniform(1 / 60, 1 / 20, 30))  # uneven frame times
    seq = np.cumsum(rng.normal(0, 4, (30, 3, 5, 2)), 0) + 200  # 3 tracks x 5 keypoints random walks, pixels
    got = run(KeypointSmoother(s), [7, 2, 11], seq, ts, scale=150.0)
    for t in range(3):
        for k in range(5):
            np.testing.assert_allclose(got[:, t, k], reference_one_euro(seq[:, t, k], ts, 150.0, s), rtol=1e-9, atol=1e-9)


def test_still_point_stays_put_and_jitter_shrinks():
    rng = np.random.default_rng(1)
    ts = np.arange(90) / 30
    still = np.full((90, 1, 17, 2), 300.0)
    np.testing.assert_allclose(run(KeypointSmoother(), [1], still, ts, 200.0), still)
    noisy = still + rng.normal(0, 3.0, still.shape)
    out = run(KeypointSmoother(), [1], noisy, ts, 200.0)
    jitter_in = np.abs(np.diff(noisy[30:], axis=0)).mean()
    jitter_out = np.abs(np.diff(out[30:], axis=0)).mean()
    assert jitter_out < 0.5 * jitter_in
    assert np.sqrt(((out[30:] - 300) ** 2).mean()) < np.sqrt(((noisy[30:] - 300) ** 2).mean())


def test_tracks_are_independent_of_each_other_and_of_their_order():
    rng = np.random.default_rng(2)
    ts = np.arange(10) / 25
    seq = rng.normal(100, 10, (10, 2, 4, 2))
    both = run(KeypointSmoother(), [5, 9], seq, ts, 100.0)
    swapped = run(KeypointSmoother(), [9, 5], seq[:, ::-1], ts, 100.0)
    alone = run(KeypointSmoother(), [9], seq[:, 1:], ts, 100.0)
    np.testing.assert_allclose(both[:, ::-1], swapped)
    np.testing.assert_allclose(both[:, 1:], alone)


def test_speed_is_in_person_heights_so_scaling_the_scene_scales_the_output():
    rng = np.random.default_rng(3)
    ts = np.arange(20) / 30
    seq = np.cumsum(rng.normal(0, 5, (20, 1, 3, 2)), 0)
    s = OneEuroSettings(beta=2.0)
    small = run(KeypointSmoother(s), [1], seq, ts, 50.0)
    large = run(KeypointSmoother(s), [1], 4 * seq, ts, 200.0)
    np.testing.assert_allclose(large, 4 * small, rtol=1e-9, atol=1e-9)


def test_drop_forgets_a_track_and_a_new_or_stale_time_restarts_it():
    sm = KeypointSmoother()
    first = np.zeros((1, 2, 2))
    sm(np.array([3, 4]), np.zeros((2, 2, 2)), 0.0, np.ones(2) * 100)
    assert sorted(sm.track_ids) == [3, 4]
    sm.drop([3])
    assert sm.track_ids == [4]
    raw = first + 50
    np.testing.assert_array_equal(sm(np.array([3]), raw, 0.1, np.ones(1) * 100), raw)  # restarted: raw
    moved = sm(np.array([4]), raw, 0.1, np.ones(1) * 100)
    assert (moved < raw).all() and (moved > 0).all()  # filtered: between the old and the new position
    np.testing.assert_array_equal(sm(np.array([4]), raw, 0.1, np.ones(1) * 100), raw)  # same time again: restart
    sm.reset()
    assert len(sm) == 0


def test_empty_frame_and_input_not_mutated():
    sm = KeypointSmoother()
    assert sm(np.zeros(0, np.int64), np.zeros((0, 17, 2)), 0.0, np.zeros(0)).shape == (0, 17, 2)
    kp = np.ones((1, 17, 2))
    sm(np.array([1]), kp, 0.0, np.ones(1))
    kp2 = kp + 10
    sm(np.array([1]), kp2, 1 / 30, np.ones(1))
    assert (kp2 == 11).all()


@pytest.mark.parametrize("kw", [{"min_cutoff": 0}, {"d_cutoff": -1}, {"beta": -0.1}, {"min_cutoff": float("nan")}])
def test_bad_settings_are_config_errors(kw):
    with pytest.raises(ConfigError):
        OneEuroSettings(**kw)
