"""A predict run's options as typed objects (kapao.infer.options): keywords routed to their object, the
defaults those of the keyword API."""
from __future__ import annotations

import pytest

from kapao.cfg.settings import PREDICT_SETTINGS
from kapao.infer.options import DrawOptions, OutputOptions, PredictOptions, run_options


def test_run_options_route_keywords_to_their_object_and_keywords_win():
    opts, out = run_options({})
    assert opts == PredictOptions(1280, PREDICT_SETTINGS, None, None, 1)
    assert out == OutputOptions(save=True, save_json=True, show=False, draw=DrawOptions(), project="runs/predict",
                                name="exp", keep_results=False, progress=False, resume=None)
    base = PredictOptions(imgsz=640, batch=4)
    opts, out = run_options({"imgsz": 256, "save": False, "resume": True}, base, OutputOptions(name="a"))
    assert opts == PredictOptions(imgsz=256, batch=4) and (out.save, out.resume, out.name) == (False, True, "a")


def test_run_options_refuse_a_keyword_of_no_object():
    with pytest.raises(TypeError, match="unexpected keyword argument 'img_size'"):
        run_options({"img_size": 640})


def test_options_are_frozen():
    with pytest.raises(AttributeError):
        PredictOptions().imgsz = 64  # type: ignore[misc]
    with pytest.raises(AttributeError):
        DrawOptions().show_boxes = True  # type: ignore[misc]
