"""The options of a predict run as typed objects: what is predicted (:class:`PredictOptions`), what is
written and shown (:class:`OutputOptions`) and how poses are drawn (:class:`DrawOptions`). The CLI builds
them from its parameters by field name (:func:`kapao.cfg.fields.from_fields`); ``KAPAO.run`` takes them
or their fields as keywords."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from kapao.cfg.fields import route_fields
from kapao.cfg.settings import PREDICT_SETTINGS, InferenceSettings


@dataclass(frozen=True)
class DrawOptions:
    """How drawn images and videos show the poses."""

    show_boxes: bool = False
    show_scores: bool = False
    show_kp_objects: bool = False
    line_width: int | None = None
    fused_only: bool = False  # draw only keypoints confirmed by a keypoint object (Poses.fused)
    track_ids: bool = True  # label tracked poses with their id (they are coloured by track either way)


@dataclass(frozen=True)
class PredictOptions:
    """What a run predicts: input size (long side, pixels), thresholds, TTA passes, images per batch."""

    imgsz: int = 1280
    settings: InferenceSettings = PREDICT_SETTINGS
    scales: Sequence[float] | None = None  # TTA: one image scale per pass
    flips: Sequence[bool] | None = None  # TTA: one left-right flip per pass
    batch: int = 1  # images per batch (video frames always go one by one)


@dataclass(frozen=True)
class OutputOptions:
    """What a run writes and shows, and where: drawn media (`save`), predictions.jsonl/.json (`save_json`),
    a window (`show`), the run folder project/nameN (or the run `resume` continues), Poses kept in memory."""

    save: bool = True
    save_json: bool = True
    show: bool = False
    draw: DrawOptions | None = field(default_factory=DrawOptions)  # None: the defaults
    project: str | Path = "runs/predict"
    name: str = "exp"
    keep_results: bool = False  # also keep every frame's Poses in PredictRun.results (memory grows)
    progress: bool = False  # show a progress bar
    resume: bool | str | Path | None = None  # a run folder (or its predictions.jsonl), or True/"latest"


def run_options(keywords: Mapping[str, Any], options: PredictOptions | None = None,
                output: OutputOptions | None = None) -> tuple[PredictOptions, OutputOptions]:
    """`options` and `output` (defaults when None) with the fields given as keywords changed; TypeError for
    a keyword that is a field of neither."""
    predict_kw, output_kw = route_fields(keywords, PredictOptions, OutputOptions)
    return (dataclasses.replace(options or PredictOptions(), **predict_kw),
            dataclasses.replace(output or OutputOptions(), **output_kw))
