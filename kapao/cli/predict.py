"""The `predict` and `track` commands (one shared body; track is predict with a tracking step and its
own run folder), added to the `kapao` group by :mod:`kapao.cli.main`."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from kapao.cfg.settings import PREDICT_SETTINGS, OneEuroSettings
from kapao.cli.options import (
    announce_tta,
    bad_parameter,
    calibration,
    check_half,
    predict_options,
    settings_from,
    smooth_settings,
    tracking_options,
    tta_passes,
)
from kapao.errors import ConfigError
from kapao.runtime import setup_logging

if TYPE_CHECKING:
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
def predict(ctx: click.Context, resume: str | None, track_: bool, tracker: str | None, smooth: bool | None,
            smooth_cutoff: float | None, smooth_beta: float | None, **opts: Any) -> None:
    """Run pose estimation on SOURCE: image, folder, glob, video, webcam index (0) or stream URL.

    Without SOURCE it runs on the sample images that ship with ultralytics. Results go to runs/predict/expN:
    predictions.jsonl (one line per frame, written as it is made), drawn media, and a COCO-format
    predictions.json at the end. --track adds track ids (as `kapao track`; keypoints unsmoothed unless --smooth).
    """
    if not track_ and (tracker or smooth is not None or smooth_cutoff is not None or smooth_beta is not None):
        raise click.UsageError("--tracker/--smooth/--smooth-cutoff/--smooth-beta need --track (or use `kapao track`)")
    if track_ and resume:
        raise click.UsageError("--resume cannot continue tracks (ids would start again); drop --track or --resume")
    tracking = _tracking(tracker, smooth_settings(bool(smooth), smooth_cutoff, smooth_beta)) if track_ else None
    _predict(ctx, tracking, resume=resume, **opts)


@click.command()
@predict_options("runs/track")
@tracking_options
@click.pass_context
def track(ctx: click.Context, tracker: str | None, smooth: bool | None, smooth_cutoff: float | None,
          smooth_beta: float | None, **opts: Any) -> None:
    """Track people through SOURCE (video, stream, webcam or image sequence): every pose gets a track id.

    Same options as predict (but --resume), plus the tracker (ByteTrack or BoT-SORT from ultralytics) and
    One Euro smoothing of each track's keypoints (on by default). Drawn videos colour each track; results
    go to runs/track/expN (predictions.jsonl/.json with track_id; keypoints.csv with --save-csv).
    """
    _predict(ctx, _tracking(tracker, smooth_settings(smooth is not False, smooth_cutoff, smooth_beta)), **opts)


def _tracking(tracker: str | None, smooth: OneEuroSettings | None) -> PoseTracker:
    """The per-frame tracking step the options ask for (a usage error for an unusable --tracker)."""
    from kapao.track.tracker import PoseTracker

    try:
        return PoseTracker(tracker or "bytetrack", smooth)
    except ConfigError as e:
        raise click.BadParameter(str(e).removeprefix(f"--tracker {tracker}: "), param_hint="'--tracker'") from None


def _predict(ctx: click.Context, tracking: PoseTracker | None, source: str | None, weights: str, imgsz: int | None,
             device: str | None, half: bool, backend: str, int8: bool, calib: str | None, calib_images: int,
             batch: int, conf, iou, conf_kp, iou_kp, conf_kp_person,  # noqa: ANN001
             tolerance, max_det, no_fuse, scales, flips, tta, project: str, name: str, nosave: bool,  # noqa: ANN001
             save_csv: bool, show: bool, boxes: bool, scores: bool, kp_objects: bool, fused_only: bool,
             line_width: int | None, track_ids: bool = True, resume: str | None = None) -> None:
    """predict and track: build the settings, run, print the summary."""
    from kapao.cli.ranks import launch_if_listed
    from kapao.data.sources import resolve_source  # OpenCV only: a bad SOURCE fails before torch is imported
    from kapao.distributed import DistEnv
    from kapao.errors import DataError

    launch_if_listed(ctx.info_name, device)  # --device 0,1,2,3: one process per GPU, this one waits for them
    env = DistEnv.from_environ()
    setup_logging(ctx.obj.get("verbose", False), main_process=env.main)
    scales, flips = tta_passes(scales, flips, tta)
    base = PREDICT_SETTINGS
    if resume:  # the run's own options where none are given
        source, weights, imgsz, scales, flips, base, resume = _resume_defaults(ctx, resume, source, weights, imgsz,
                                                                               scales, flips, project, name)
    settings = settings_from(base, conf, iou, conf_kp, iou_kp, conf_kp_person, tolerance, max_det, no_fuse)
    try:
        spec = resolve_source(source)  # a SOURCE that names nothing usable fails before the weights are loaded
    except DataError as e:
        raise bad_parameter(e, ctx, "source") from None
    check_half(ctx, half, device)
    from kapao.infer.keypoints_csv import CsvSink
    from kapao.infer.predictor import KAPAO
    from kapao.infer.shard import has_parts
    from kapao.infer.sinks import DrawOptions

    if env.main:
        announce_tta(scales, flips)
    from kapao.weights.registry import native_imgsz

    int8_calib = calibration(int8, calib, calib_images, imgsz or native_imgsz(weights))
    draw = DrawOptions(boxes, scores, kp_objects, line_width, fused_only, track_ids)
    if env.distributed or (resume and has_parts(Path(resume))):
        if show:
            raise click.UsageError("--show opens one window; it cannot be shared by processes: drop --show")
        csv = [CsvSink([])] if save_csv else []  # names filled in once the weights are loaded
        _sharded(ctx, env, tracking, spec, csv, weights=weights, device=device, half=half, backend=backend, int8=int8_calib,
                 imgsz=imgsz, settings=settings, scales=scales, flips=flips, batch=batch, save=not nosave, draw=draw,
                 project=project, name=name, resume=resume)
        return
    api = KAPAO(weights, device=device, half=half, backend=backend, int8=int8_calib)
    try:
        run = api.run(spec, imgsz=imgsz or api.default_imgsz, settings=settings, scales=scales, flips=flips, batch=batch,
                      save=not nosave, show=show, draw=draw, project=project, name=name, keep_results=False,
                      progress=True, resume=resume, transforms=[tracking.update_frame] if tracking else (),
                      sinks=[CsvSink(api.schema.names)] if save_csv else ())
    except ConfigError as e:
        if str(e).startswith("--resume"):
            raise bad_parameter(e, ctx, "resume") from None
        raise
    skipped = (f", {run.skipped} non-media files skipped" if run.skipped else "") + \
        (f", {len(run.unreadable)} unreadable files skipped" if run.unreadable else "") + \
        (f", {run.resumed} already done" if run.resumed else "")
    tracks = f", {tracking.tracks_total} tracks" if tracking is not None else ""
    click.echo(f"{run.frames} frames, {run.poses} poses{tracks} in {run.seconds:.1f} s "
               f"({run.frames / max(run.seconds, 1e-9):.1f} fps; {run.timing.summary()}){skipped}")
    click.echo(f"Results saved to {run.save_dir}")


def _sharded(ctx: click.Context, env, tracking, spec, csv, *, weights, device, half, backend, int8, imgsz,  # noqa: ANN001
             **run: Any) -> None:
    """predict/track as one rank of a torchrun job: bring the rank up, run its share, rank 0 prints the summary.
    A rank stopped because another failed exits 1 quietly (rank 0 prints the failing rank's error)."""
    from kapao.cli.ranks import as_rank
    from kapao.distributed import agree
    from kapao.infer.predictor import KAPAO
    from kapao.infer.shard import run_sharded

    def body(dev: str | None):  # noqa: ANN202
        api, error = None, None
        try:
            api = KAPAO(weights, device=dev, half=half, backend=backend, int8=int8)
        except Exception as e:  # noqa: BLE001 - every rank learns of it in agree()
            error = e
        agree(error, env)
        for sink in csv:
            sink.names = list(api.schema.names)
        return run_sharded(api, spec, env, imgsz=imgsz or api.default_imgsz, transforms=[tracking.update_frame]
                           if tracking else (), sinks=csv, track=tracking is not None, progress=True, **run)

    try:
        res = as_rank(env, device, body)
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


def _resume_defaults(ctx: click.Context, resume: str, source, weights, imgsz, scales, flips, project, name):  # noqa: ANN001, ANN202
    """The run --resume names, and its SOURCE, weights, imgsz, TTA and thresholds for the options not given."""
    import dataclasses

    from kapao.cfg.settings import InferenceSettings
    from kapao.infer.resume import find_resume_run, read_run_args

    try:
        run_dir = find_resume_run(resume, project, name, source)
        stored = read_run_args(run_dir)
    except ConfigError as e:
        raise bad_parameter(e, ctx, "resume") from None
    if ctx.get_parameter_source("weights") == click.core.ParameterSource.DEFAULT and stored.get("weights"):
        weights = stored["weights"]
    if not (scales or flips):
        scales, flips = stored.get("scales"), stored.get("flips")
    base = PREDICT_SETTINGS.replace(**{f.name: stored.get(f.name) for f in dataclasses.fields(InferenceSettings)})
    return source or stored["source"], weights, imgsz or stored.get("imgsz"), scales, flips, base, str(run_dir)
