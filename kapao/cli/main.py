"""The `kapao` command: a thin click layer that parses options, builds settings and calls the library."""
from __future__ import annotations

import sys
import warnings

import click

from kapao.cfg.dataset import load_dataset_config, resolve_schema
from kapao.cfg.schema import DatasetConfig
from kapao.cfg.settings import VAL_SETTINGS, Hyp
from kapao.cli.options import (
    MODEL_SIZES,
    ImgShape,
    ImgSize,
    announce_tta,
    backend_options,
    bad_parameter,
    calibration,
    check_device,
    check_devices,
    check_half,
    given,
    inference_options,
    int8_options,
    must_exist,
    settings_from,
    tta_passes,
)
from kapao.cli.predict import predict, track
from kapao.errors import ConfigError, DataError, KapaoError
from kapao.runtime import quiet_third_party, setup_logging
from kapao.version import __version__
from kapao.weights.registry import weights_help

RESUME_OPTIONS = ("resume", "epochs", "hyp_set", "device", "workers", "project")  # what a resume may set
MAX_LINE_WIDTH = 100  # pixels; wider lines hide the image

class KapaoGroup(click.Group):
    """Turns every error into one line on stderr unless --verbose asks for the traceback.

    Exit codes (one rule for all verbs): 2 when the command line is wrong: a value malformed, out of
    range, not finite, contradicting another option, asking for hardware this machine lacks (--half
    without CUDA, a missing GPU) or naming something that does not exist (SOURCE, --weights, --data,
    --hyp, --resume, a dataset folder); checked before anything heavy runs. 1 when what the options name
    exists but fails while running: corrupt or unsafe files, unreadable media, invalid annotations,
    diverged training, disk, memory and permission problems, and unexpected errors (a bug: the line
    points to --verbose). 130 on Ctrl-C.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Accept --verbose anywhere before `--` (after the verb too), as if given before the verb."""
        end = args.index("--") if "--" in args else len(args)
        if "--verbose" in args[:end]:
            args = ["--verbose", *(a for a in args[:end] if a != "--verbose"), *args[end:]]
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)
        except Exception as e:  # noqa: BLE001 - the one place that turns any error into one line
            if ctx.obj and ctx.obj.get("verbose"):
                raise
            click.secho(f"Error: {error_line(e)}", err=True, fg="red")
            sys.exit(e.exit_code if isinstance(e, KapaoError) else 1)


def error_line(e: Exception) -> str:
    """The one line printed for an error: a KapaoError's own message; out-of-memory with what to lower;
    anything else named as unexpected, with the way to its traceback."""
    if isinstance(e, KapaoError):
        return str(e)
    first = (str(e).strip().splitlines() or [""])[0]
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or "can't allocate memory" in first:
        return ("out of memory: the input is too large for this machine; use a smaller --imgsz or --batch "
                "(add --verbose for details)")
    return f"unexpected {type(e).__name__}: {first[:300]} (a bug? rerun with --verbose for the traceback and report it)"


@click.group(cls=KapaoGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="kapao")
@click.option("--verbose", is_flag=True, help="Show full tracebacks and debug output.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """KAPAO multi-person pose estimation: keypoints and poses as objects."""
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose


cli.add_command(predict)
cli.add_command(track)


@cli.command()
@click.option("--weights", default=None, callback=must_exist("weights"),
              help=f"Describe a checkpoint (kapao or official file) or named weights: {weights_help()}.")
@click.option("--names", "list_names", is_flag=True, help="List the named weights (published AP, dataset, input size).")
@click.option("--size", type=click.Choice(MODEL_SIZES), default="s", show_default=True, help="Model size.")
@click.option("--kpts", type=click.IntRange(min=1), default=None,
              help="Number of keypoints (17: COCO names, 14: CrowdPose names, else kp0..kpK-1). [default: 17]")
@click.option("--data", default=None, callback=must_exist("data"),
              help="Take the keypoint schema from a dataset config: coco, crowdpose or a YAML.")
@click.option("--imgsz", type=ImgSize(), default=1280, show_default=True, help="Square input size for the GFLOPs figure.")
def info(weights: str | None, list_names: bool, size: str, kpts: int | None, data: str | None, imgsz: int) -> None:
    """Print a model summary: layers, parameters, GFLOPs and keypoint names (named weights: their entry
    too; the summary once the file is in the cache)."""
    from kapao.models.network import build_model, format_model_info, model_info
    from kapao.weights.registry import DETECTORS, REGISTRY, check_weights_spec

    ctx = click.get_current_context()
    if kpts is not None and data is not None:
        raise click.UsageError(f"--kpts {kpts} contradicts --data {data} (the dataset sets the keypoints); give one")
    if weights is not None and given(ctx, "size", "kpts", "data"):
        raise click.UsageError(f"{', '.join(given(ctx, 'size', 'kpts', 'data'))} describe a new model; --weights "
                               "already fixes size and keypoints: give either --weights or those")
    if list_names:
        for e in REGISTRY.values():
            ap = f"{e.ap:.1f} AP ({e.benchmark})" if e.ap is not None else "AP not published"
            click.echo(f"{e.name:<18} {e.dataset:<9} imgsz {e.imgsz}  {ap}")
        return
    if weights is None:
        try:
            schema = resolve_schema(num_keypoints=kpts, data=data)
        except ConfigError as e:  # a --data YAML that is not a dataset config: a usage error, as for val/train
            raise bad_parameter(e, ctx, "data") from None
        model = build_model(size, schema)
        click.echo(format_model_info(model_info(model, imgsz)))
        return
    path, name = check_weights_spec(weights)
    if name in DETECTORS:  # a start for training, not a pose model
        click.echo(DETECTORS[name].describe())
        click.echo("downloaded" if path.is_file() else "not downloaded yet: `kapao train --weights NAME` downloads it")
        return
    if name is not None:
        click.echo(REGISTRY[name].describe())
        if not path.is_file():
            click.echo("not downloaded yet: `kapao predict/val --weights NAME` downloads it")
            return
    from kapao.weights.loader import load_model

    model, meta = load_model(weights)
    click.echo(format_model_info(model_info(model, imgsz)))
    click.echo(f"weights: {meta['path']} ({meta['format']} checkpoint)")
    extra = meta.get("extra") or {}
    trained = extra.get("dataset") or extra.get("data")
    if trained:
        name = trained.get("name") if isinstance(trained, dict) else trained
        click.echo(f"trained on: {name}" + (f", epoch {meta['epoch']}" if meta.get("epoch") not in (None, -1) else ""))
    metrics = extra.get("metrics") or {}
    if metrics:
        click.echo("metrics: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float))))
    if meta.get("best_fitness") is not None:
        click.echo(f"best fitness: {float(meta['best_fitness']):.4f}")


def _dataset_config(ctx: click.Context, data: str, single_cls: bool) -> DatasetConfig:
    """--data read as a dataset config; a YAML that is not one (malformed, several classes without
    --single-cls) is a usage error naming --data."""
    try:
        return load_dataset_config(data, single_cls=single_cls)
    except ConfigError as e:
        raise bad_parameter(e, ctx, "data") from None


@cli.command()
@click.option("--weights", default=None, callback=must_exist("weights"),
              help="Checkpoint or name. [default: kapao_s_coco; kapao_s_crowdpose with --crowdpose]")
@click.option("--data", default=None, callback=must_exist("data"), help="coco, crowdpose or a dataset YAML. [default: coco]")
@click.option("--split", type=click.Choice(["val", "test", "train"]), default=None, help="Split to evaluate. [default: val]")
@click.option("--crowdpose", is_flag=True, help="Shorthand: --data crowdpose --split test (--weights kapao_s_crowdpose).")
@click.option("--single-cls", is_flag=True, help="Merge the classes of a multi-class YOLO-pose dataset into one.")
@click.option("--imgsz", type=ImgSize(), default=1280, show_default=True, help="Inference size (long side).")
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True, help="Images per batch.")
@click.option("--workers", type=click.IntRange(min=0), default=4, show_default=True, help="Data-loading processes.")
@click.option("--device", default=None, callback=check_devices,
              help="cpu, 0, 1, … or a GPU list 0,1 (one process each, the split shared). [default: first GPU, else cpu]")
@click.option("--half", is_flag=True, help="FP16 inference (CUDA only).")
@backend_options
@inference_options(VAL_SETTINGS)
@click.option("--project", default="runs/val", show_default=True, help="Parent folder of run folders.")
@click.option("--name", default="exp", show_default=True, help="Run folder name (incremented).")
@click.pass_context
def val(ctx: click.Context, weights: str | None, data: str | None, split: str | None, crowdpose: bool, single_cls: bool,
        imgsz: int, batch: int, workers: int, device: str | None, half: bool, backend: str, int8: bool,
        calib: str | None, calib_images: int,
        conf, iou, conf_kp, iou_kp, conf_kp_person, tolerance, max_det, no_fuse, scales, flips, tta,  # noqa: ANN001
        project: str, name: str) -> None:
    """Evaluate weights on a dataset split: COCO keypoint AP, or CrowdPose AP (easy/medium/hard).

    Many processes: --device 0,1,2,3, or torchrun --nproc-per-node N -m kapao val … (each predicts a
    share of the batches, rank 0 computes the metrics: the same as one process)."""
    from kapao.cli.ranks import as_rank, launch_if_listed
    from kapao.distributed import DistEnv

    launch_if_listed("val", device)
    env = DistEnv.from_environ()
    setup_logging(ctx.obj.get("verbose", False), main_process=env.main)
    if crowdpose:
        if data not in (None, "crowdpose"):
            raise click.UsageError(f"--crowdpose means --data crowdpose; it contradicts --data {data}")
        data, split = "crowdpose", split or "test"
        weights = weights or "kapao_s_crowdpose"
    data, split, weights = data or "coco", split or "val", weights or "kapao_s_coco"
    scales, flips = tta_passes(scales, flips, tta)
    settings = settings_from(VAL_SETTINGS, conf, iou, conf_kp, iou_kp, conf_kp_person, tolerance, max_det, no_fuse)
    cfg = _dataset_config(ctx, data, single_cls)
    try:
        cfg.require(split)  # a missing dataset or split is a usage error, before anything is loaded or created
    except (ConfigError, DataError) as e:
        raise bad_parameter(e, ctx, "data") from None
    check_half(ctx, half, device)
    from kapao.eval.val import run_val

    if env.main:
        announce_tta(scales, flips)
    int8_calib = calibration(int8, calib, calib_images, imgsz)
    res = as_rank(env, device, lambda dev: run_val(
        weights, cfg, split=split, imgsz=imgsz, batch=batch, workers=workers, device=dev, half=half, settings=settings,
        scales=scales, flips=flips, project=project, name=name, backend=backend, int8=int8_calib, env=env,
        progress=env.main))
    if res is None:
        return
    save_dir = res.json_path.parent
    click.echo(f"{cfg.name} {split} ({res.protocol} protocol): {res.images} images, {res.poses} poses")
    click.echo(res.table())
    if cfg.yolo is not None:
        from kapao.data.yolo_labels import OKS_AREA_NOTE

        click.echo(OKS_AREA_NOTE)
    ms = res.timing_ms
    click.echo(f"Speed: {ms['pre']:.1f} ms pre-process, {ms['infer']:.1f} ms inference, {ms['post']:.1f} ms NMS+fusion per image")
    click.echo(f"Results saved to {save_dir}")


def _hyp_set(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, float]:
    out = {}
    for item in values:
        key, sep, val = item.partition("=")
        try:
            out[key.strip()] = float(val)
        except ValueError:
            raise click.BadParameter(f"{item!r}: expected KEY=NUMBER such as lr0=0.02", ctx, param) from None
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r}: expected KEY=NUMBER such as lr0=0.02", ctx, param)
    if out:  # names and ranges checked now, against the defaults
        try:
            Hyp.from_dict({**Hyp().to_dict(), **out}, where="--hyp-set")
        except KapaoError as e:
            raise click.BadParameter(str(e).removeprefix("--hyp-set: "), ctx, param) from None
    return out


def _check_start_weights(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Like must_exist("weights"), but '' (random initialisation) is allowed."""
    return value if value == "" else must_exist("weights")(ctx, param, value)


@cli.command(context_settings={"ignore_unknown_options": False})
@click.option("--size", type=click.Choice(MODEL_SIZES), default=None, help="Model size. [default: that of --weights, else s]")
@click.option("--data", default="coco", show_default=True, callback=must_exist("data"), help="coco, crowdpose or a dataset YAML.")
@click.option("--imgsz", type=ImgSize(), default=1280, show_default=True, help="Train/val image size.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Epochs. [default: 500 coco, 300 otherwise]")
@click.option("--batch", type=click.IntRange(min=1), default=None,
              help="Total batch size (all GPUs). [default: the paper's 128/72/48 for s/m/l where the GPUs hold it "
                   "(4 x 32 GB at 1280), else 16 accumulated to 64]")
@click.option("--device", default=None, callback=check_devices,
              help="cpu, 0, or a GPU list 0,1,2,3 (one DDP process each). [default: first GPU, else cpu]")
@click.option("--workers", type=click.IntRange(min=0), default=8, show_default=True, help="Data-loading processes per GPU.")
@click.option("--weights", default=None, callback=_check_start_weights,
              help="Initial weights: kapao checkpoint, official KAPAO file, state dict, YOLOv5 P6 detector or name. "
                   "[default: the paper's start, the COCO-pretrained yolov5{s,m,l,x}6 detector of --size "
                   "(downloaded once); '' or --scratch: random initialisation]")
@click.option("--scratch", is_flag=True, help="Train from random initialisation (same as --weights '').")
@click.option("--hyp", default=None, callback=must_exist("hyp"),
              help="Hyperparameter YAML (keys not given keep the defaults of data/hyp-kapao.yaml).")
@click.option("--hyp-set", "hyp_set", multiple=True, callback=_hyp_set, metavar="KEY=VALUE",
              help="Override one hyperparameter, e.g. --hyp-set lr0=0.02 (repeatable).")
@click.option("--project", default="runs/train", show_default=True, help="Parent folder of run folders.")
@click.option("--name", default="exp", show_default=True, help="Run folder name (incremented: exp, exp2, …).")
@click.option("--exist-ok", is_flag=True, help="Reuse project/name instead of incrementing it.")
@click.option("--resume", is_flag=False, flag_value="latest", default=None, metavar="[RUN|last.pt]",
              help="Resume the latest run, a run folder or a last.pt.")
@click.option("--noval", is_flag=True, help="Validate only after the final epoch.")
@click.option("--nosave", is_flag=True, help="Save checkpoints only at the end (and on Ctrl-C).")
@click.option("--patience", type=click.IntRange(min=0), default=100, show_default=True,
              help="Stop after this many epochs without improvement (0: never).")
@click.option("--cache", is_flag=True, help="Keep resized training images in RAM.")
@click.option("--sync-bn", is_flag=True, help="SyncBatchNorm across GPUs.")
@click.option("--no-amp", is_flag=True, help="Disable mixed precision on CUDA.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("--single-cls", is_flag=True, help="Merge the classes of a multi-class YOLO-pose dataset into one.")
@click.option("--no-plots", is_flag=True, help="Skip train_batch*.jpg, val_pred.jpg and results.png.")
@click.pass_context
def train(ctx: click.Context, size: str | None, data: str, imgsz: int, epochs: int | None, batch: int, device: str | None,
          workers: int, weights: str | None, scratch: bool, hyp: str | None, hyp_set: dict[str, float], project: str,
          name: str,
          exist_ok: bool, resume: str | None, noval: bool, nosave: bool, patience: int, cache: bool, sync_bn: bool,
          no_amp: bool, seed: int, single_cls: bool, no_plots: bool) -> None:
    """Train a KAPAO model (or resume a run); writes runs/train/expN with weights/best.pt and last.pt.

    Multi-GPU: --device 0,1,2,3, or torchrun --nproc_per_node 4 -m kapao train ….
    """
    setup_logging(ctx.obj.get("verbose", False))
    if scratch and weights:
        raise click.UsageError(f"--scratch trains from random initialisation; --weights {weights} names initial "
                               "weights: give one of them")
    weights = "" if scratch else weights
    if resume:
        fixed = given(ctx, *(p.name for p in ctx.command.params if p.name not in RESUME_OPTIONS))
        if fixed:
            raise click.UsageError(f"--resume continues a run with its own settings; {', '.join(fixed)} cannot change "
                                   "(on resume: --epochs, --hyp-set lr0=/lrf=, --device, --workers, --project)")
        from kapao.train.run import resolve_resume

        try:
            resolve_resume(resume, project)  # nothing to resume: a usage error, before anything starts
        except ConfigError as e:
            raise bad_parameter(e, ctx, "resume") from None
    else:
        with warnings.catch_warnings():  # training reads the YAML again and warns then
            warnings.simplefilter("ignore")
            cfg = _dataset_config(ctx, data, single_cls)
        try:  # a missing dataset or split is a usage error, before a run folder is made
            for split in ("train", "val"):
                cfg.require(split)
        except (ConfigError, DataError) as e:
            raise bad_parameter(e, ctx, "data") from None
    from kapao.cli.ranks import launch_if_listed
    from kapao.train.run import TrainArgs
    from kapao.train.trainer import train as run_training

    launch_if_listed("train", device)
    args = TrainArgs(data=data, size=size, imgsz=imgsz, epochs=epochs, batch=batch, device=device or "",
                     workers=workers, weights=weights, hyp=hyp, hyp_overrides=hyp_set, project=project, name=name,
                     exist_ok=exist_ok, resume=resume, noval=noval, nosave=nosave, patience=patience, cache=cache,
                     sync_bn=sync_bn, amp=not no_amp, seed=seed, single_cls=single_cls, plots=not no_plots)
    run_dir = run_training(args)
    click.echo(f"Results saved to {run_dir}")


@cli.command()
@click.option("--data", required=True, callback=must_exist("data"),
              help="coco, crowdpose, a kapao dataset YAML or an Ultralytics YOLO-pose data YAML.")
@click.option("--split", "splits", type=click.Choice(["train", "val", "test"]), multiple=True,
              help="Split to check (repeatable). [default: all]")
@click.option("--single-cls", is_flag=True, help="Merge the classes of a multi-class YOLO-pose dataset into one.")
@click.option("--samples", type=click.IntRange(min=0), default=4, show_default=True,
              help="Annotated images drawn per split.")
@click.option("--project", default="runs/check", show_default=True, help="Parent folder of run folders.")
@click.option("--name", default="exp", show_default=True, help="Run folder name (incremented).")
@click.pass_context
def check(ctx: click.Context, data: str, splits: tuple[str, ...], single_cls: bool, samples: int, project: str,
          name: str) -> None:
    """Check a dataset: counts per split and every problem found, with the file and what to do.

    Exit status 1 when it found errors. Annotated samples go to runs/check/expN.
    """
    from kapao.data.check import check_dataset, format_report

    setup_logging(ctx.obj.get("verbose", False))
    try:
        report = check_dataset(data, single_cls=single_cls, splits=splits or None, samples=samples, project=project,
                               name=name)
    except ConfigError as e:  # a YAML that cannot be read as a dataset config: the --data value is wrong
        raise bad_parameter(e, ctx, "data") from None
    click.echo(format_report(report))
    click.echo(f"Samples saved to {report.save_dir}")
    if report.errors:
        sys.exit(1)


@cli.command()
@click.option("--data", required=True, callback=must_exist("data"), help="The dataset to convert: a dataset YAML.")
@click.option("--to", "to", type=click.Choice(["yolo", "coco"]), required=True,
              help="yolo: Ultralytics YOLO-pose txt labels; coco: COCO keypoint JSON.")
@click.option("--out", required=True, help="New (or empty) output folder.")
@click.option("--copy-images", is_flag=True, help="--to yolo: copy the images instead of linking them.")
@click.option("--single-cls", is_flag=True, help="Merge the classes of a multi-class YOLO-pose dataset into one.")
@click.pass_context
def convert(ctx: click.Context, data: str, to: str, out: str, copy_images: bool, single_cls: bool) -> None:
    """Convert a dataset between COCO keypoint JSON and the Ultralytics YOLO-pose layout."""
    from kapao.data.convert import coco_to_yolo, yolo_to_coco

    setup_logging(ctx.obj.get("verbose", False))
    cfg = _dataset_config(ctx, data, single_cls)
    if cfg.format == to:
        raise click.UsageError(f"{data} is already in the {to} layout; use --to {'coco' if to == 'yolo' else 'yolo'}")
    try:
        res = coco_to_yolo(cfg, out, copy_images=copy_images) if to == "yolo" else yolo_to_coco(cfg, out)
    except ConfigError as e:  # --out is not a new or empty folder
        raise bad_parameter(e, ctx, "out") from None
    click.echo(res.summary())
    click.echo(f"Dataset YAML: {res.yaml_path} (use it as --data)")


@cli.command()
@click.option("--weights", default="kapao_s_coco", show_default=True, callback=must_exist("weights"),
              help="Checkpoint or name to export.")
@click.option("--format", "fmt", type=click.Choice(["onnx"]), default="onnx", show_default=True, help="Export format.")
@click.option("--imgsz", type=ImgShape(), default="640", show_default=True,
              help="Input size: 640 or H,W (multiples of 64); fixed unless --dynamic.")
@click.option("--dynamic", is_flag=True, help="Free batch, height and width.")
@click.option("--half", is_flag=True, help="FP16 export (CUDA only).")
@click.option("--simplify", is_flag=True, help="Simplify the graph with onnxslim.")
@click.option("--opset", type=click.IntRange(min=13), default=17, show_default=True, help="ONNX opset (SiLU needs 13+).")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Fixed batch (ignored with --dynamic).")
@click.option("--device", default=None, callback=check_device, help="cpu, 0, … [default: cpu; first GPU with --half]")
@click.option("-o", "--output", default=None, help="Output file or folder. [default: <weights stem>.onnx next to the weights]")
@click.option("--exist-ok", is_flag=True, help="Overwrite an existing output file (else export refuses).")
@click.option("--check-image", default=None, help="Image for the onnxruntime-vs-torch check. [default: ultralytics bus.jpg]")
@click.option("--no-check", is_flag=True, help="Skip the onnxruntime-vs-torch check.")
@int8_options(with_data=True)
@click.pass_context
def export(ctx: click.Context, weights: str, fmt: str, imgsz: tuple[int, int], dynamic: bool, half: bool, simplify: bool,
           opset: int, batch: int, device: str | None, output: str | None, exist_ok: bool, check_image: str | None,
           no_check: bool, int8: bool, data: str | None, calib: str | None, calib_images: int) -> None:
    """Export weights to ONNX: images (B, 3, H, W) RGB 0-1 -> decoded (B, N, 6 + 3K); the schema travels in the file."""
    setup_logging(ctx.obj.get("verbose", False))
    if int8 and half:  # contradicting options: a usage error, before the CUDA check
        raise click.UsageError("--int8 and --half exclude each other: int8 runs on the CPU (onnxruntime); drop one")
    check_half(ctx, half, device)
    from kapao.backends.runtimes import read_metadata
    from kapao.export import describe_check, export_onnx

    int8_calib = calibration(int8, calib, calib_images, max(imgsz), data)
    path = export_onnx(weights, output, imgsz, dynamic=dynamic, half=half, simplify=simplify, opset=opset,
                       batch=batch, check_image=check_image, check=not no_check, device=device, exist_ok=exist_ok,
                       int8=int8_calib)
    info = read_metadata(path)
    shape = "dynamic batch/height/width" if info.dynamic else f"input {info.batch}x3x{info.imgsz[0]}x{info.imgsz[1]}"
    precision = "int8" if int8 else "fp16" if info.half else "fp32"
    click.echo(f"Exported {path} ({path.stat().st_size / 1e6:.1f} MB; {shape}; {precision}; opset {opset})")
    click.echo(describe_check(info.raw))
    click.echo(f"Run it: kapao predict SOURCE --weights {path}")


def main() -> None:
    quiet_third_party()
    cli(obj={})


if __name__ == "__main__":
    main()
