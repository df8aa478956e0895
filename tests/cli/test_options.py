"""Shared option pieces of the `kapao` verbs (kapao.cli.options) built from click's parameters by name."""
from __future__ import annotations

import click
import pytest

from kapao.cfg.fields import from_fields
from kapao.cfg.settings import PREDICT_SETTINGS, VAL_SETTINGS, OneEuroSettings
from kapao.cli.options import TrackingOptions, settings_from


def test_settings_from_takes_the_thresholds_given_by_field_name():
    params = {"conf": 0.3, "iou": None, "conf_kp": None, "iou_kp": 0.6, "conf_kp_person": None, "tolerance": None,
              "max_det": 7, "no_fuse": True, "scales": None}
    got = settings_from(VAL_SETTINGS, params)
    assert got == VAL_SETTINGS.replace(conf=0.3, iou_kp=0.6, max_det=7, fuse=False)
    none = dict.fromkeys(params) | {"no_fuse": False}
    assert settings_from(PREDICT_SETTINGS, none) == PREDICT_SETTINGS  # nothing given: the defaults


def test_tracking_options_say_what_was_given_and_the_smoothing():
    params = {"tracker": None, "smooth": None, "smooth_cutoff": None, "smooth_beta": None, "track_ids": True}
    t = from_fields(TrackingOptions, params)
    assert not t.given and t.smoothing(True) == OneEuroSettings() and t.smoothing(False) is None
    t = from_fields(TrackingOptions, params | {"smooth_beta": 0.5})
    assert t.given and t.smoothing(True) == OneEuroSettings(beta=0.5)
    with pytest.raises(click.UsageError, match="drop them or drop --no-smooth"):
        from_fields(TrackingOptions, params | {"smooth": False, "smooth_cutoff": 2.0}).smoothing(True)
    assert from_fields(TrackingOptions, params | {"tracker": "botsort"}).given
