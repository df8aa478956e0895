"""The `predict` and `track` commands (one shared body; track is predict with a tracking step and its
own run folder), added to the `kapao` group by :mod:`kapao.cli.main`."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from kapao.cfg.fields import from_fields
from kapao.cfg.settings import PREDICT_SETTINGS, InferenceSettings
from kapao.cli.options import (
    TrackingOptions,
    announce_tta,
    bad_parameter,
    calibration,
    check_half,
    predict_options,
    settings_from,
    tracking_options,
    tta_passes,
)
from kapao.errors import ConfigError
from kapao.runtime import setup_logging

if TYPE_CHECKING:
    from kapao.backends.int8 import Int8Calibration
    from kapao.data.sources import SourceSpec
    from kapao.distributed import DistEnv
    from kapao.track.tracker import PoseTracker


@click.command()
@predict_options("runs/predict")
@click.option("--resume", is_flag=False, flag_value="latest", default=None, metavar="[RUN]",
              help="Continue a run: skip the images/frames in its predictions.jsonl, append the rest. RUN: a run "
                   "folder; alone: --project/--name when --name is given, else the latest run (of SOURCE if given). "
                   "Options not given are the run's own.")
@click.option("--track", "track_", is_flag=True, help="Give every pose a track id across video frames (see `kapao track`).")
@tracking_options
@click.pass_context
def predict(ctx: click.Context, resume: str | None, track_: bool, **params: Any) -> None:
    """Run pose estimation on SOURCE: image, folder, glob, video, webcam index (0) or stream URL.

    Without SOURCE it runs on the sample images that ship with ultralytics. Results go to runs/predict/expN:
    predictions.jsonl (one line per frame, written as it is made), drawn media, and a COCO-format
    predictions.json at the end. --track adds track ids (as `kapao track`; keypoints unsmoothed unless --smooth).
    """
    tracking = from_fields(TrackingOptions, params)
    if not track_ and tracking.given:
        raise click.UsageError("--tracker/--smooth/--smooth-cutoff/--smooth-beta need --track (or use `kapao track`)")
    if track_ and resume:
        raise click.UsageError("--resume cannot continue tracks (ids would start again); drop --track or --resume")
    _predict(ctx, _tracking(tracking, smooth=False) if track_ else None, params, resume=resume)


@click.command()
@predict_options("runs/track")
@tracking_options
@click.pass_context
def track(ctx: click.Context, **params: Any) -> None:
    """Track people through SOURCE (video, stream, webcam or image sequence): every pose gets a track id.

    Same options as predict (but --resume), plus the tracker (ByteTrack or BoT-SORT from ultralytics) and
    One Euro smoothing of each track's keypoints (on by default). Drawn videos colour each track; results
    go to runs/track/expN (predictions.jsonl/.json with track_id; keypoints.csv with --save-csv).
    """
    _predict(ctx, _tracking(from_fields(TrackingOptions, params), smooth=True), params)


def _tracking(options: TrackingOptions, smooth: bool) -> PoseTracker:
    """The per-frame tracking step the options ask for, smoothing on or off by default as `smooth` says (a
    usage error for an unusable --tracker)."""
    from kapao.track.tracker import PoseTracker

    smoothing = options.smoothing(smooth)
    try:
        return PoseTracker(options.tracker or "bytetrack", smoothing)
    except ConfigError as e:
        raise click.BadParameter(str(e).removeprefix(f"--tracker {options.tracker}: "),
                                 param_hint="'--tracker'") from None


def _predict(ctx: click.Context, tracking: PoseTracker | None, params: dict[str, Any], resume: str | None = None) -> None:
    """predict and track: build the run's options from the parameters (by field name), run, print the summary."""
    from kapao.cli.ranks import launch_if_listed
    from kapao.data.sources import resolve_source  # OpenCV only: a bad SOURCE fails before torch is imported
    from kapao.distributed import DistEnv
    from kapao.errors import DataError

    launch_if_listed(ctx.info_name or "predict", params["device"])  # --device 0,1,2,3: one process per GPU, this one waits
    env = DistEnv.from_environ()
    if not env.main:
        setup_logging(ctx.obj.get("verbose", False), main_process=False)
    p = dict(params)
    if p["save_conf"] and not p["save_txt"]:
        raise click.UsageError("--save-conf adds scores to the --save-txt label rows; add --save-txt")
    p["scales"], p["flips"] = tta_passes(p["scales"], p["flips"], p["tta"])
    base = PREDICT_SETTINGS
    if resume:  # the run's own options where none are given
        base, resume = _resume_defaults(ctx, resume, p)
    try:
        spec = resolve_source(p["source"])  # a SOURCE that names nothing usable fails before the weights are loaded
    except DataError as e:
        raise bad_parameter(e, ctx, "source") from None
    from kapao.weights.registry import native_imgsz

    int8_calib = calibration(p["int8"], p["calib"], p["calib_images"], p["imgsz"] or native_imgsz(p["weights"]))
    check_half(ctx, p["half"], p["device"])  # both usage errors come before torch is imported
    from kapao.infer.keypoints_csv import CsvSink
    from kapao.infer.options import DrawOptions, OutputOptions, PredictOptions
    from kapao.infer.predictor import KAPAO
    from kapao.infer.shard import has_parts

    if env.main:
        announce_tta(p["scales"], p["flips"])
    if env.distributed or (resume and has_parts(Path(resume))):
        _check_shareable(p)
        _sharded(ctx, env, tracking, spec, p, int8_calib, base, resume)
        return
    api = KAPAO(p["weights"], device=p["device"], half=p["half"], backend=p["backend"], int8=int8_calib)
    options = from_fields(PredictOptions, p, imgsz=p["imgsz"] or api.default_imgsz, settings=settings_from(base, p))
    output = from_fields(OutputOptions, p, keep=("save_json",), save=not p["nosave"], keep_results=False,
                         progress=True, resume=resume, draw=from_fields(DrawOptions, p))
    try:
        run = api.run(spec, options=options, output=output, transforms=[tracking.update_frame] if tracking else (),
                      sinks=_dataset_sinks(spec, p["save_txt"], p["save_conf"], p["save_crop"]) +
                      ([CsvSink(api.schema.names)] if p["save_csv"] else []))
    except ConfigError as e:
        if str(e).startswith("--resume"):
            raise bad_parameter(e, ctx, "resume") from None
        raise
    skipped = (f", {run.skipped} non-media files skipped" if run.skipped else "") + \
        (f", {len(run.unreadable)} unreadable files skipped" if run.unreadable else "") + \
        (f", {run.resumed} already done" if run.resumed else "")
    tracks = f", {tracking.tracks_total} tracks" if tracking is not None else ""
    assert run.timing is not None  # KAPAO.run always times its predictor
    ran = api.runs_on
    click.echo(f"{run.frames} frames, {run.poses} poses{tracks} in {run.seconds:.1f} s "
               f"({run.frames / max(run.seconds, 1e-9):.1f} fps; {ran['backend']} {ran['precision']} on {ran['device']}; "
               f"{run.timing.summary()}){skipped}")
    click.echo(f"Results saved to {run.save_dir}")


def _dataset_sinks(spec: Any, save_txt: bool, save_conf: bool, save_crop: bool) -> list[Any]:
    """The --save-txt and --save-crop sinks, naming files relative to the SOURCE folder."""
    from kapao.infer.label_sinks import CropSink, LabelSink
    from kapao.infer.records import source_root

    root = source_root(spec)
    return ([LabelSink(root, save_conf)] if save_txt else []) + ([CropSink(root)] if save_crop else [])


def _check_shareable(p: dict[str, Any]) -> None:
    """Usage errors for the options that one process alone can serve."""
    if p["show"]:
        raise click.UsageError("--show opens one window; it cannot be shared by processes: drop --show")
    if p["save_txt"] or p["save_crop"]:
        raise click.UsageError("--save-txt/--save-crop run in one process for now: drop them, or run without "
                               "several --device indices / torchrun")


def _sharded(ctx: click.Context, env: DistEnv, tracking: PoseTracker | None, spec: SourceSpec, p: dict[str, Any],
             int8: Int8Calibration | None, base: InferenceSettings, resume: str | None) -> None:
    """predict/track as one rank of a torchrun job (:mod:`kapao.infer.shard`): bring the rank up, run its
    share, rank 0 merges and prints the summary. A rank stopped because another failed exits 1 quietly."""
    from kapao.cli.ranks import as_rank
    from kapao.distributed import agree
    from kapao.infer.keypoints_csv import CsvSink
    from kapao.infer.options import DrawOptions, OutputOptions, PredictOptions
    from kapao.infer.predictor import KAPAO
    from kapao.infer.shard import run_sharded

    def body(dev: str | None):  # noqa: ANN202
        api, error = None, None
        try:
            api = KAPAO(p["weights"], device=dev, half=p["half"], backend=p["backend"], int8=int8)
        except Exception as e:  # noqa: BLE001 - every rank learns of it in agree()
            error = e
        agree(error, env)
        assert api is not None  # agree() raised otherwise
        options = from_fields(PredictOptions, p, imgsz=p["imgsz"] or api.default_imgsz, settings=settings_from(base, p))
        output = from_fields(OutputOptions, p, keep=("save_json",), save=not p["nosave"], progress=True, keep_results=False,
                             resume=resume, draw=from_fields(DrawOptions, p))
        sinks = [CsvSink(api.schema.names)] if p["save_csv"] else []  # replayed from the merged JSONL
        return run_sharded(api, spec, env, options, output, transforms=[tracking.update_frame] if tracking else (),
                           sinks=sinks, track=tracking is not None)

    try:
        res = as_rank(env, p["device"], body)
    except ConfigError as e:
        if env.main and str(e).startswith("--resume"):
            raise bad_parameter(e, ctx, "resume") from None
        raise
    if res is None:
        return
    extra = (f", {len(res.unreadable)} unreadable files skipped" if res.unreadable else "") + \
        (f", {res.resumed} already done" if res.resumed else "")
    click.echo(f"{res.frames} frames, {res.poses} poses on {env.world_size} processes in {res.seconds:.1f} s "
               f"({res.frames / max(res.seconds, 1e-9):.1f} fps){extra}")
    click.echo(f"Results saved to {res.save_dir}")


def _resume_defaults(ctx: click.Context, resume: str, p: dict[str, Any]) -> tuple[InferenceSettings, str]:
    """The run --resume names and its thresholds; its SOURCE, weights, imgsz and TTA fill in `p` (click's
    parameters, changed in place) for the options not given."""
    import dataclasses

    from kapao.infer.resume import find_resume_run, read_run_args

    try:
        run_dir = find_resume_run(resume, p["project"], p["name"], p["source"])
        stored = read_run_args(run_dir)
    except ConfigError as e:
        raise bad_parameter(e, ctx, "resume") from None
    if ctx.get_parameter_source("weights") == click.core.ParameterSource.DEFAULT and stored.get("weights"):
        p["weights"] = stored["weights"]
    if not (p["scales"] or p["flips"]):
        p["scales"], p["flips"] = stored.get("scales"), stored.get("flips")
    p["source"], p["imgsz"] = p["source"] or stored["source"], p["imgsz"] or stored.get("imgsz")
    base = PREDICT_SETTINGS.replace(**{f.name: stored.get(f.name) for f in dataclasses.fields(InferenceSettings)})
    _resume_outputs(ctx, stored, p)
    return base, str(run_dir)


def _resume_outputs(ctx: click.Context, stored: dict[str, Any], p: dict[str, Any]) -> None:
    """The output options of a resumed run (--nosave, --save-csv, drawing) as its args.yaml keeps them, set in
    `p` for those not given on this command line."""
    draw: dict[str, Any] = stored["draw"] if isinstance(stored.get("draw"), dict) else {}
    kept = {"nosave": stored.get("save") is False, "save_csv": "CsvSink" in (stored.get("sinks") or []),
            **{k: v for k, v in draw.items() if k != "track_ids"}}  # the drawing options are DrawOptions' fields
    for k, v in kept.items():
        if k in p and ctx.get_parameter_source(k) == click.core.ParameterSource.DEFAULT:
            p[k] = v
