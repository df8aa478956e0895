"""The `train` command (and resuming a run), added to the `kapao` group by :mod:`kapao.cli.main`."""
from __future__ import annotations

import warnings
from typing import Any

import click

from kapao.cfg.fields import from_fields
from kapao.cfg.settings import Hyp
from kapao.cli.options import MODEL_SIZES, ImgSize, bad_parameter, check_devices, dataset_config, given, must_exist
from kapao.errors import ConfigError, DataError, KapaoError

RESUME_OPTIONS = ("resume", "epochs", "hyp_set", "device", "workers", "project")  # what a resume may set


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


@click.command(context_settings={"ignore_unknown_options": False})
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
@click.option("--no-tensorboard", is_flag=True, help="Write no TensorBoard event files (tensorboard --logdir runs/train).")
@click.option("--logger", "loggers", type=click.Choice(["mlflow", "wandb"]), multiple=True,
              help="Also log to MLflow or Weights & Biases (pip install 'kapao[mlflow]' / 'kapao[wandb]').")
@click.pass_context
def train(ctx: click.Context, **params: Any) -> None:
    """Train a KAPAO model (or resume a run); writes runs/train/expN with weights/best.pt and last.pt.

    Multi-GPU: --device 0,1,2,3, or torchrun --nproc_per_node 4 -m kapao train ….
    """
    if params["scratch"] and params["weights"]:
        raise click.UsageError(f"--scratch trains from random initialisation; --weights {params['weights']} names "
                               "initial weights: give one of them")
    _check_run(ctx, params["resume"], params["project"], params["data"], params["single_cls"])
    if params["hyp"] and not params["resume"]:  # a hostile or malformed --hyp: a usage error before any weights
        from kapao.cfg.settings import load_hyp

        try:
            load_hyp(params["hyp"])
        except ConfigError as e:
            raise bad_parameter(e, ctx, "hyp") from None
    from kapao.cli.ranks import launch_if_listed
    from kapao.train.run import TrainArgs
    from kapao.train.trainer import train as run_training

    launch_if_listed("train", params["device"])
    args = from_fields(TrainArgs, params, device=params["device"] or "", hyp_overrides=params["hyp_set"],
                       weights="" if params["scratch"] else params["weights"], amp=not params["no_amp"],
                       plots=not params["no_plots"], tensorboard=not params["no_tensorboard"],
                       loggers=list(params["loggers"]))
    run_dir = run_training(args)
    click.echo(f"Results saved to {run_dir}")


def _check_run(ctx: click.Context, resume: str | None, project: str, data: str, single_cls: bool) -> None:
    """Usage errors before a run starts: options a resume cannot change, nothing to resume, a missing
    dataset or split."""
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
        return
    with warnings.catch_warnings():  # training reads the YAML again and warns then
        warnings.simplefilter("ignore")
        cfg = dataset_config(ctx, data, single_cls)
    try:  # a missing dataset or split is a usage error, before a run folder is made
        for split in ("train", "val"):
            cfg.require(split)
    except (ConfigError, DataError) as e:
        raise bad_parameter(e, ctx, "data") from None
