"""The evaluation options of `kapao val`: --predictions (a results file instead of a model), --analyze
(error analysis) and --metric pck; parsing and printing only, the work is in kapao.eval.report."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import click

from kapao.cli.options import FiniteRange, bad_parameter
from kapao.errors import ConfigError, DataError

if TYPE_CHECKING:
    from kapao.eval.report import Extras

MODEL_ONLY = ("weights", "imgsz", "batch", "workers", "device", "half", "backend", "int8", "calib", "conf", "iou",
              "conf_kp", "iou_kp", "conf_kp_person", "tolerance", "max_det", "no_fuse", "scales", "flips", "tta")


@dataclass
class Evaluation:
    """What --predictions, --analyze, --metric, --alpha and --images ask of a val run."""

    predictions: str | None
    analyze: bool
    metric: str
    alpha: float
    images: str | None

    def run(self, ctx: click.Context, data: str | None, split: str | None, single_cls: bool, crowdpose: bool,
            project: str, name: str) -> None:
        """Evaluate the --predictions file (after checking that no model option contradicts it)."""
        check_prediction_mode(ctx, self.predictions, crowdpose)
        assert self.predictions is not None  # run only with --predictions
        run_predictions(ctx, self.predictions, data, split or "val", single_cls, self.analyze, self.metric, self.alpha,
                        self.images, project, name)

    def report(self, data: str, split: str, single_cls: bool, predictions_json: Path) -> None:
        """After a model val: the analysis and/or PCK of the predictions.json it wrote (nothing if not asked)."""
        if self.analyze or self.metric == "pck":
            from kapao.eval.report import extras_of_run

            echo_extras(extras_of_run(data, split, single_cls, predictions_json, analyze=self.analyze,
                                      pck=self.metric == "pck", alpha=self.alpha, image_dir=self.images))


def evaluation_options(f: Callable) -> Callable:
    """--predictions, --analyze, --metric, --alpha and --images, given to `f` as one `evaluation` (Evaluation);
    with --predictions the results file is evaluated here and `f` (the model val) is not called."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ev = Evaluation(**{k: kwargs.pop(k) for k in ("predictions", "analyze", "metric", "alpha", "images")})
        if ev.predictions is None:
            return f(*args, **kwargs, evaluation=ev)
        ctx = click.get_current_context()  # logging: set up once by the group
        return ev.run(ctx, *(kwargs[k] for k in ("data", "split", "single_cls", "crowdpose", "project", "name")))

    for opt in reversed([
        click.option("--predictions", default=None, type=click.Path(exists=True, dir_okay=False),
                     help="Evaluate this COCO keypoint results JSON instead of running a model; --data may then "
                          "also be a COCO keypoint annotations JSON."),
        click.option("--analyze", is_flag=True,
                     help="Error analysis (Ronchi & Perona 2017): analysis.json, a table and pictures in the run folder."),
        click.option("--metric", type=click.Choice(["coco", "pck"]), default="coco", show_default=True,
                     help="pck: also PCK@alpha by person box, PCKh@0.5 with head boxes and AUC (matched persons only)."),
        click.option("--alpha", type=FiniteRange(0.0, 1.0, min_open=True), default=0.2, show_default=True,
                     help="PCK threshold as a fraction of the person box size max(w, h)."),
        click.option("--images", default=None, type=click.Path(exists=True, file_okay=False),
                     help="Image folder for the analysis gallery when --data is an annotations JSON."),
    ]):
        wrapper = opt(wrapper)
    return wrapper


def check_prediction_mode(ctx: click.Context, predictions: str | None, crowdpose: bool) -> None:
    """With --predictions, the options that describe a model run contradict it: a usage error naming them."""
    if predictions is None:
        return
    given = [f"--{n.replace('_', '-')}" for n in MODEL_ONLY
             if ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE]
    if given:
        raise click.UsageError(f"{', '.join(given)} describe a model run; --predictions evaluates a results file "
                               "without a model: drop them or drop --predictions")
    if crowdpose:
        raise click.UsageError("--crowdpose chooses the model and the data; with --predictions give --data instead")


def run_predictions(ctx: click.Context, predictions: str, data: str | None, split: str, single_cls: bool,
                    analyze: bool, metric: str, alpha: float, images: str | None, project: str, name: str) -> None:
    """Evaluate a results file and print what val prints, then the extras."""
    from kapao.eval.report import run_prediction_val

    if data is None:
        raise click.UsageError("--predictions needs --data: a dataset (coco, crowdpose, a YAML) or an annotations JSON")
    if not data.lower().endswith(".json"):
        from kapao.cfg.dataset import load_dataset_config

        try:  # a missing dataset or split is a usage error, as for a model val
            load_dataset_config(data, single_cls=single_cls).require(split)
        except (ConfigError, DataError) as e:
            raise bad_parameter(e, ctx, "data") from None
    try:
        res = run_prediction_val(predictions, data, split=split, single_cls=single_cls, analyze=analyze,
                                 pck=metric == "pck", alpha=alpha, image_dir=Path(images) if images else None,
                                 project=project, name=name)
    except ConfigError as e:  # --data is not a dataset config
        raise bad_parameter(e, ctx, "data") from None
    where = res.gt.name or res.gt.source
    click.echo(f"{where} ({res.protocol} protocol): {len(res.gt.coco.imgs)} images, {res.poses} poses from {predictions}")
    click.echo(res.table())
    echo_extras(res.extras)
    click.echo(f"Results saved to {res.save_dir}")


def echo_extras(extras: Extras) -> None:
    """Print the analysis/PCK tables and the pictures written."""
    for text in extras.lines:
        click.echo(text)
    pictures = [p for p in extras.files if p.suffix in (".png", ".jpg")]
    if pictures:
        click.echo("Pictures: " + ", ".join(p.name for p in pictures))
    if extras.seconds:
        click.echo("Extra time: " + ", ".join(f"{k} {v:.1f} s" for k, v in extras.seconds.items()))
