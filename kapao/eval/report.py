"""What `kapao val` adds to the metrics: evaluation of a prediction file without a model, and the optional
error analysis (analysis.json + pictures) and PCK (pck.json), written into the run folder."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from kapao.errors import DataError
from kapao.eval.metrics import evaluate, format_metrics
from kapao.eval.results import GroundTruth, load_ground_truth, load_predictions
from kapao.runtime import atomic_write, increment_run_dir, remove_if_empty


@dataclass
class Extras:
    """Text to print and files written by the analysis and PCK (empty when neither was asked for)."""

    lines: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class PredictionVal:
    """The result of evaluating a prediction file: metrics, protocol, counts, run folder and extras."""

    metrics: dict[str, float]
    protocol: Literal["coco", "crowdpose"]
    images: int
    poses: int
    save_dir: Path
    gt: GroundTruth
    extras: Extras

    def table(self) -> str:
        return format_metrics(self.metrics)


def write_json(data: Any, path: Path) -> Path:
    """`data` as indented JSON, atomically; DataError naming the file when it cannot be written."""
    try:
        with atomic_write(path, "w") as f:
            json.dump(data, f, indent=1)
    except OSError as e:
        raise DataError(f"cannot write {path}: {e.strerror or e}; free disk space or choose another --project") from None
    return path


def run_extras(gt: GroundTruth, results: Sequence[dict[str, Any]], save_dir: Path, *, analyze: bool = False,
               pck: bool = False, alpha: float = 0.2, image_dir: Path | None = None, progress: bool = True) -> Extras:
    """The error analysis (analysis.json, pictures, table) and/or PCK (pck.json, table) of `results`."""
    out = Extras()
    if analyze:
        from kapao.eval.analysis_plots import save_pictures
        from kapao.eval.diagnosis import diagnose, format_analysis

        t0 = time.perf_counter()
        an = diagnose(gt.coco, results, gt.schema, gt.protocol)
        out.seconds["analysis"] = time.perf_counter() - t0
        out.files.append(write_json(an.summary, save_dir / "analysis.json"))
        t0 = time.perf_counter()
        out.files += save_pictures(an, save_dir, gt.schema, image_dir or gt.image_dir)
        out.seconds["pictures"] = time.perf_counter() - t0
        out.lines.append(format_analysis(an.summary))
    if pck:
        from kapao.eval.pck import evaluate_pck, format_pck

        t0 = time.perf_counter()
        p = evaluate_pck(gt.coco, results, gt.schema, gt.protocol, alpha)
        out.seconds["pck"] = time.perf_counter() - t0
        out.files.append(write_json(p, save_dir / "pck.json"))
        out.lines.append(format_pck(p))
    return out


def extras_of_run(data: str, split: str, single_cls: bool, predictions_json: Path, *, analyze: bool = False,
                  pck: bool = False, alpha: float = 0.2, image_dir: str | Path | None = None) -> Extras:
    """The extras of a model val run, from the predictions.json it wrote (into the same run folder)."""
    gt = load_ground_truth(data, split, single_cls=single_cls)
    results = load_predictions(predictions_json, gt)
    return run_extras(gt, results, predictions_json.parent, analyze=analyze, pck=pck, alpha=alpha,
                      image_dir=Path(image_dir) if image_dir else None)


def run_prediction_val(predictions: str | Path, data: str, *, split: str = "val", single_cls: bool = False,
                       analyze: bool = False, pck: bool = False, alpha: float = 0.2, image_dir: Path | None = None,
                       project: str | Path = "runs/val", name: str = "exp") -> PredictionVal:
    """`kapao val --predictions RESULTS.json --data DATA`: the val metrics of a results file (COCO or
    CrowdPose protocol, as the data decides), plus the extras; everything goes to a new project/nameN."""
    gt = load_ground_truth(data, split, single_cls=single_cls)
    results = load_predictions(predictions, gt)
    metrics = evaluate(gt.coco, results, gt.schema, gt.protocol)
    save_dir = increment_run_dir(project, name)
    try:
        write_json(metrics, save_dir / "metrics.json")
        extras = run_extras(gt, results, save_dir, analyze=analyze, pck=pck, alpha=alpha, image_dir=image_dir)
    except BaseException:
        remove_if_empty(save_dir)
        raise
    images = len({r["image_id"] for r in results})
    return PredictionVal(metrics, gt.protocol, images, len(results), save_dir, gt, extras)
