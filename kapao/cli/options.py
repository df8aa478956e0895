"""Click parameter types, callbacks and option groups shared by the `kapao` verbs (validated at parse
time, so a wrong command line exits with 2 before anything heavy is imported)."""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import click

from kapao.cfg.dataset import check_dataset_spec, load_dataset_config
from kapao.cfg.schema import OFFICIAL_TTA, DatasetConfig, check_imgsz
from kapao.cfg.settings import PREDICT_SETTINGS, InferenceSettings, OneEuroSettings, check_hyp_spec
from kapao.errors import ConfigError, KapaoError
from kapao.runtime import select_device
from kapao.weights.registry import weights_help

if TYPE_CHECKING:
    from kapao.backends.int8 import Int8Calibration

MAX_LINE_WIDTH = 100  # pixels; wider lines hide the image

MODEL_SIZES = ["n", "s", "m", "l", "x"]  # = kapao.models.network.SIZES, literal so that `kapao --help` needs no torch


class ImgSize(click.ParamType):
    """A positive multiple of the network's largest stride (64), checked by kapao.cfg.schema.check_imgsz."""

    name = "imgsz"

    def convert(self, value, param, ctx):  # noqa: ANN001, ANN201
        try:
            v = int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not an integer", param, ctx)
        try:
            return check_imgsz(v)
        except ConfigError as e:
            self.fail(str(e).removeprefix("--imgsz "), param, ctx)


class FloatList(click.ParamType):
    """Comma-separated floats, e.g. `0.8,1,1.2`."""

    name = "floats"

    def convert(self, value, param, ctx):  # noqa: ANN001, ANN201
        if isinstance(value, (list, tuple)):
            return list(value)
        try:
            vals = [float(v) for v in str(value).split(",") if v.strip()]
        except ValueError:
            self.fail(f"{value!r}: expected comma-separated numbers such as 0.8,1,1.2", param, ctx)
        if not vals or not all(v > 0 and math.isfinite(v) for v in vals):
            self.fail(f"{value!r}: expected positive numbers such as 0.8,1,1.2", param, ctx)
        return vals


class FlipList(click.ParamType):
    """Comma-separated flips: `none` (or 0/-1) and `lr` (or 1/3), e.g. `none,lr,none`."""

    name = "flips"
    WORDS = {"none": False, "0": False, "-1": False, "n": False, "lr": True, "1": True, "3": True}

    def convert(self, value, param, ctx):  # noqa: ANN001, ANN201
        if isinstance(value, (list, tuple)):
            return list(value)
        items = [v.strip().lower() for v in str(value).split(",") if v.strip()]
        bad = [v for v in items if v not in self.WORDS]
        if bad or not items:
            self.fail(f"{value!r}: use none or lr per pass, e.g. none,lr,none", param, ctx)
        return [self.WORDS[v] for v in items]


def check_device(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Validate --device now so a bad value is a usage error (exit 2) naming the valid choices."""
    if value is None or value == "":
        return value
    try:
        select_device(value)
    except ConfigError as e:
        raise click.BadParameter(str(e).removeprefix(f"--device '{value}': "), ctx, param) from None
    return value


def check_devices(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Like :func:`check_device`, but a GPU list (0,1,2,3) is allowed: it launches one process per GPU."""
    if value and "," in value:
        ids = [d.strip() for d in value.split(",")]
        if not all(d.isdigit() for d in ids) or len(set(ids)) != len(ids):
            raise click.BadParameter(f"{value!r}: expected cpu, mps, a GPU index or distinct GPU indices such as 0,1", ctx, param)
        for d in ids:
            check_device(ctx, param, d)
        return value
    return check_device(ctx, param, value)


def bad_parameter(e: Exception, ctx: click.Context, param: click.Parameter | str) -> click.BadParameter:
    """A library error about one option's value as a usage error (exit 2) naming that option."""
    if isinstance(param, str):
        param = next(p for p in ctx.command.params if p.name == param)
    return click.BadParameter(re.sub(rf"^{re.escape(param.opts[0])}:? ", "", str(e)), ctx, param)


def must_exist(what: str) -> Callable:
    """Callback: the value must name something that exists — a built-in name or an existing file —
    checked at parse time without reading it (`what`: data, hyp or weights). Reading it comes later."""

    def callback(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value is None:
            return value
        check: Callable[[str], object]  # the checks return different things; only their errors matter here
        if what == "weights":
            from kapao.weights.registry import check_weights_spec as check
        else:
            check = check_dataset_spec if what == "data" else check_hyp_spec
        try:
            check(value)
        except KapaoError as e:
            raise bad_parameter(e, ctx, param) from None
        return value

    return callback


class FiniteRange(click.FloatRange):
    """click.FloatRange that also refuses nan (which compares false with every bound) and inf."""

    def convert(self, value, param, ctx):  # noqa: ANN001, ANN201
        v = super().convert(value, param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return v


UNIT = FiniteRange(0.0, 1.0)


def check_half(ctx: click.Context, half: bool, device: str | None, bf16: bool = True) -> None:
    """--half on a device without fp16 (CUDA) or native bf16 (a CPU with AVX512_BF16 or AMX; `bf16` False:
    CUDA only, as export) is a usage error (exit 2) saying why, found before loading anything
    (:func:`kapao.backends.precision.check_precision`, the check the dispatcher makes again)."""
    if not half:
        return
    from kapao.backends.precision import WHY_CLI, PrecisionError, check_precision, half_precision  # imports torch

    dev = select_device(device)
    try:
        if bf16 and dev.type == "cpu":  # without native bf16: the sentence says why
            check_precision("bf16", dev)
        else:
            check_precision(half_precision(dev) if bf16 else "fp16", dev, why=WHY_CLI)
    except PrecisionError as e:
        param = next(p for p in ctx.command.params if p.name == "half")
        raise click.BadParameter(e.reason, ctx, param) from None


def given(ctx: click.Context, *names: str) -> list[str]:
    """The options among `names` the user typed (not defaults), as their flags (e.g. ['--size'])."""
    src = click.core.ParameterSource.COMMANDLINE
    params = {p.name: p for p in ctx.command.params}
    return [params[n].opts[0] for n in names if ctx.get_parameter_source(n) == src]


def inference_options(defaults: InferenceSettings) -> Callable:
    """Threshold and TTA options shared by predict and val (defaults differ: demo vs val settings)."""

    def wrap(f):  # noqa: ANN001, ANN202
        opts = [
            click.option("--conf", type=UNIT, default=None, help=f"Pose (person) score threshold. [default: {defaults.conf}]"),
            click.option("--iou", type=UNIT, default=None, help=f"Pose NMS IoU threshold. [default: {defaults.iou}]"),
            click.option("--conf-kp", type=UNIT, default=None,
                         help=f"Keypoint-object score threshold. [default: {defaults.conf_kp}]"),
            click.option("--iou-kp", type=UNIT, default=None,
                         help=f"Keypoint-object NMS IoU threshold. [default: {defaults.iou_kp}]"),
            click.option("--conf-kp-person", type=UNIT, default=None,
                         help=f"Poses above this score take part in keypoint fusion. [default: {defaults.conf_kp_person}]"),
            click.option("--tolerance", type=FiniteRange(min=0), default=None,
                         help=f"Fusion distance in original-image pixels. [default: {defaults.tolerance}]"),
            click.option("--max-det", type=click.IntRange(min=1), default=None,
                         help=f"Max poses per image. [default: {defaults.max_det}]"),
            click.option("--no-fuse", is_flag=True, help="Keep the regressed keypoints; skip keypoint-object fusion."),
            click.option("--scales", type=FloatList(), default=None, help="TTA: comma-separated image scales, e.g. 0.8,1,1.2."),
            click.option("--flips", type=FlipList(), default=None,
                         help="TTA: one flip per scale: none or lr, e.g. none,lr,none."),
            click.option("--tta", is_flag=True,
                         help="The official TTA: --scales 0.8,1,1.2 --flips none,lr,none (3 passes: about 3x the time)."),
        ]
        for o in reversed(opts):
            f = o(f)
        return f

    return wrap


def settings_from(defaults: InferenceSettings, params: Mapping[str, Any]) -> InferenceSettings:
    """`defaults` with the thresholds given on the command line, by field name (None = keep the default;
    --no-fuse sets fuse)."""
    given = {f.name: params.get(f.name) for f in dataclasses.fields(InferenceSettings)}
    return defaults.replace(**{**given, "fuse": False if params["no_fuse"] else None})


def dataset_config(ctx: click.Context, data: str, single_cls: bool) -> DatasetConfig:
    """--data read as a dataset config; a YAML that is not one (malformed, several classes without
    --single-cls) is a usage error naming --data."""
    try:
        return load_dataset_config(data, single_cls=single_cls)
    except ConfigError as e:
        raise bad_parameter(e, ctx, "data") from None


def tta_passes(scales: list[float] | None, flips: list[bool] | None, tta: bool) -> tuple[list[float] | None, list[bool] | None]:
    """The TTA passes (scales, flips) asked for by --tta or --scales/--flips; a usage error if they contradict."""
    if tta:
        if scales or flips:
            raise click.UsageError("--tta is the official --scales/--flips; give either --tta or --scales/--flips")
        return list(OFFICIAL_TTA[0]), list(OFFICIAL_TTA[1])
    if scales and flips and len(scales) != len(flips):
        raise click.UsageError(f"--scales has {len(scales)} values but --flips has {len(flips)}; give one flip per scale")
    return scales, flips


def announce_tta(scales: list[float] | None, flips: list[bool] | None) -> None:
    """Say what test-time augmentation costs before a run starts (stderr)."""
    n = max(len(scales or []), len(flips or []))
    if n > 1:
        click.echo(f"TTA: {n} passes per image, about {n}x the inference time", err=True)


# = kapao.backends.dispatch.BACKENDS, literal so that `kapao --help` needs no torch
BACKEND_NAMES = ("auto", "torch", "torch-cl", "onnxruntime", "openvino", "torchscript")
HALF_HELP = ("Half precision: fp16 on CUDA; bfloat16 (torch autocast, channels_last) on a CPU with native bf16 "
             "(AVX512_BF16 or AMX), 2-3.5x faster than the default fp32 in video runs there, at a small cost in "
             "accuracy (8 bits of mantissa: poses agreed with fp32's at OKS AP 1.0 on a small test, README 'bf16'); "
             "decoding, NMS and fusion stay fp32. [default: fp32]")
DEFAULT_CALIB_IMAGES = 32  # = kapao.backends.int8.DEFAULT_CALIB_IMAGES
INT8_COST = ("int8 is 1.7-3.8x faster than fp32 on CPUs with VNNI but costs accuracy: its poses agreed with "
             "fp32's at OKS AP 0.63-0.97 on small tests (README, section 'int8')")


def check_calib(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Callback: --calib names a folder of images or a dataset (built-in name or YAML)."""
    if value is None or Path(value).is_dir():
        return value
    try:
        check_dataset_spec(value)
    except KapaoError:
        raise click.BadParameter(f"{value} is neither a folder of images nor a dataset (coco, crowdpose or a YAML)",
                                 ctx, param) from None
    return value


def int8_options(with_data: bool = False) -> Callable:
    """--int8, --calib and --calib-images (and --data, for export: a dataset's val images)."""

    def wrap(f):  # noqa: ANN001, ANN202
        what = "--data or --calib" if with_data else "--calib"
        opts = [
            click.option("--int8", is_flag=True, help=f"Statically quantised int8 model (onnxruntime QDQ) calibrated "
                                                      f"on {what}. {INT8_COST}."),
            *([click.option("--data", default=None, callback=must_exist("data"),
                            help="int8 calibration on a dataset's val images.")] if with_data else []),
            click.option("--calib", default=None, callback=check_calib,
                         help="int8 calibration images: a folder, or a dataset (its val images)."),
            click.option("--calib-images", type=click.IntRange(min=1), default=DEFAULT_CALIB_IMAGES, show_default=True,
                         help="Number of calibration images (spread over the folder)."),
        ]
        for o in reversed(opts):
            f = o(f)
        return f

    return wrap


def predict_options(project: str) -> Callable:
    """SOURCE and the options of predict, shared by track (which differs only in its run folder)."""

    def wrap(f):  # noqa: ANN001, ANN202
        opts = [
            click.argument("source", required=False),
            click.option("--weights", default="kapao_s_coco", show_default=True, callback=must_exist("weights"),
                         help=f"kapao checkpoint, official KAPAO checkpoint, exported .onnx file, or a name: {weights_help()}."),
            click.option("--imgsz", type=ImgSize(), default=None,
                         help="Inference size (long side). [default: 1280; a fixed-shape ONNX file's own size]"),
            click.option("--device", default=None, callback=check_devices,
                         help="cpu, 0, 1, … or a GPU list 0,1,2,3 (one process each, work split between them). "
                              "[default: first GPU, else cpu]"),
            click.option("--half", is_flag=True, help=HALF_HELP),
            backend_options,
            click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Images per batch (folders)."),
            inference_options(PREDICT_SETTINGS),
            click.option("--project", default=project, show_default=True, help="Parent folder of run folders."),
            click.option("--name", default="exp", show_default=True, help="Run folder name (incremented: exp, exp2, …)."),
            click.option("--nosave", is_flag=True,
                         help="Do not write drawn images/videos (predictions.jsonl/.json are still written)."),
            click.option("--save-csv", is_flag=True, help="Also write keypoints.csv: source, frame, pose, track, keypoint, "
                                                          "x, y, confidence (one row per keypoint, written as it goes)."),
            click.option("--save-txt", is_flag=True, help="Also write YOLO-pose label files (labels/*.txt) of the "
                                                          "predictions: a keypoint is labelled when its confidence >= 0.5."),
            click.option("--save-conf", is_flag=True, help="With --save-txt: append each pose's score to its row."),
            click.option("--save-crop", is_flag=True, help="Also write every person box as an image (crops/person/)."),
            click.option("--show", is_flag=True, help="Show results in a window (needs a display)."),
            click.option("--boxes/--no-boxes", "show_boxes", default=False, show_default=True, help="Draw person boxes."),
            click.option("--scores/--no-scores", "show_scores", default=False, show_default=True,
                         help="Draw pose scores (with --boxes)."),
            click.option("--kp-objects", "show_kp_objects", is_flag=True, help="Draw keypoint-object boxes."),
            click.option("--fused-only", is_flag=True, help="Draw only keypoints confirmed by a keypoint object (fused)."),
            click.option("--line-width", type=click.IntRange(min=1, max=MAX_LINE_WIDTH), default=None,
                         help="Line width in pixels. [default: from image size]"),
        ]
        for o in reversed(opts):
            f = o(f)
        return f

    return wrap


def backend_options(f):  # noqa: ANN001, ANN201
    """--backend and the int8 options, shared by predict and val."""
    f = int8_options()(f)
    return click.option("--backend", type=click.Choice(BACKEND_NAMES), default="auto", show_default=True,
                        help="Runtime of the network. auto: torch on a GPU; on the CPU a .pt runs through a cached "
                             "ONNX export (made once on first use). torch-cl: torch with channels_last. All give the "
                             "same poses within fp32 rounding.")(f)


def calibration(int8: bool, calib: str | None, count: int, imgsz: int, data: str | None = None) -> Int8Calibration | None:
    """The int8 calibration asked for (None without --int8); usage errors when --int8, --calib and --data disagree."""
    if data and calib:
        raise click.UsageError("give either --data or --calib for the int8 calibration, not both")
    calib = calib or data
    if not int8:
        if calib:
            raise click.UsageError(f"--{'calib' if not data else 'data'} is for --int8 here; add --int8 or drop it")
        return None
    if not calib:
        raise click.UsageError("--int8 needs calibration images: --calib DIR (a folder of typical images) or a dataset")
    from kapao.backends.int8 import Int8Calibration

    return Int8Calibration.from_spec(calib, imgsz, count)


class ImgShape(click.ParamType):
    """640 (square) or H,W: positive multiples of 64."""

    name = "imgsz"

    def convert(self, value, param, ctx):  # noqa: ANN001, ANN201
        if isinstance(value, tuple):
            return value
        parts = [p.strip() for p in str(value).replace("x", ",").split(",") if p.strip()]
        if len(parts) not in (1, 2):
            self.fail(f"{value!r}: expected 640 or H,W such as 384,640", param, ctx)
        v = [ImgSize().convert(p, param, ctx) for p in parts]
        return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def tracking_options(f: Callable) -> Callable:
    """Tracker and keypoint-smoothing options of track and predict --track."""
    defaults = OneEuroSettings()
    opts = [
        click.option("--tracker", default=None, metavar="bytetrack|botsort|FILE.yaml",
                     help="ultralytics tracker, or a tracker YAML (tracker_type + the settings to change). [default: bytetrack]"),
        click.option("--smooth/--no-smooth", default=None,
                     help="One Euro smoothing of each track's keypoints. [default: on for track, off for predict --track]"),
        click.option("--smooth-cutoff", type=FiniteRange(min=0, min_open=True), default=None,
                     help=f"Smoothing cutoff at rest, Hz (lower = steadier). [default: {defaults.min_cutoff}]"),
        click.option("--smooth-beta", type=FiniteRange(min=0), default=None,
                     help=f"Cutoff increase with speed (higher = less lag on fast moves). [default: {defaults.beta}]"),
        click.option("--track-ids/--no-track-ids", default=True, show_default=True,
                     help="Label drawn poses with their track id."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@dataclass(frozen=True)
class TrackingOptions:
    """The tracker and smoothing options of track and predict --track as given (None: not given); built
    from click's parameters by field name."""

    tracker: str | None = None
    smooth: bool | None = None
    smooth_cutoff: float | None = None
    smooth_beta: float | None = None

    @property
    def given(self) -> bool:
        """Whether any of them was given."""
        return bool(self.tracker) or any(v is not None for v in (self.smooth, self.smooth_cutoff, self.smooth_beta))

    def smoothing(self, default: bool) -> OneEuroSettings | None:
        """The smoothing asked for (`default`: on or off when neither --smooth nor --no-smooth is given)."""
        return smooth_settings(default if self.smooth is None else self.smooth, self.smooth_cutoff, self.smooth_beta)


def smooth_settings(smooth: bool, cutoff: float | None, beta: float | None) -> OneEuroSettings | None:
    """The smoothing the options ask for (None: off); a usage error for tuning values with --no-smooth."""
    if not smooth:
        if cutoff is not None or beta is not None:
            raise click.UsageError("--smooth-cutoff/--smooth-beta set the smoothing; drop them or drop --no-smooth")
        return None
    return OneEuroSettings(**{k: v for k, v in (("min_cutoff", cutoff), ("beta", beta)) if v is not None})
