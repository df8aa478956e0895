"""The `val` command: evaluate weights on a dataset split, added to the `kapao` group by :mod:`kapao.cli.main`."""
from __future__ import annotations

from typing import Any

import click

from kapao.cfg.settings import VAL_SETTINGS
from kapao.cli.evaluate import evaluation_options
from kapao.cli.options import (
    HALF_HELP,
    ImgSize,
    announce_tta,
    backend_options,
    bad_parameter,
    calibration,
    check_devices,
    check_half,
    dataset_config,
    inference_options,
    must_exist,
    settings_from,
    tta_passes,
)
from kapao.errors import ConfigError, DataError
from kapao.runtime import setup_logging


@click.command()
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
@click.option("--half", is_flag=True, help=HALF_HELP)
@backend_options
@inference_options(VAL_SETTINGS)
@click.option("--project", default="runs/val", show_default=True, help="Parent folder of run folders.")
@click.option("--name", default="exp", show_default=True, help="Run folder name (incremented).")
@evaluation_options
@click.pass_context
def val(ctx: click.Context, **params: Any) -> None:
    """Evaluate weights or a results file (--predictions) on a dataset split: COCO keypoint AP, or CrowdPose AP.

    Many processes: --device 0,1,2,3, or torchrun --nproc-per-node N -m kapao val … (each predicts a
    share of the batches, rank 0 computes the metrics: the same as one process)."""
    from kapao.cli.ranks import as_rank, launch_if_listed
    from kapao.distributed import DistEnv

    p = params
    launch_if_listed("val", p["device"])
    env = DistEnv.from_environ()
    if not env.main:
        setup_logging(ctx.obj.get("verbose", False), main_process=False)
    data, split, weights = _target(p["data"], p["split"], p["weights"], p["crowdpose"])
    scales, flips = tta_passes(p["scales"], p["flips"], p["tta"])
    settings = settings_from(VAL_SETTINGS, p)
    cfg = dataset_config(ctx, data, p["single_cls"])
    try:
        cfg.require(split)  # a missing dataset or split is a usage error, before anything is loaded or created
    except (ConfigError, DataError) as e:
        raise bad_parameter(e, ctx, "data") from None
    int8_calib = calibration(p["int8"], p["calib"], p["calib_images"], p["imgsz"])  # usage errors before torch
    check_half(ctx, p["half"], p["device"])
    from kapao.eval.val import run_val

    if env.main:
        announce_tta(scales, flips)
    res = as_rank(env, p["device"], lambda dev: run_val(
        weights, cfg, split=split, imgsz=p["imgsz"], batch=p["batch"], workers=p["workers"], device=dev,
        half=p["half"], settings=settings, scales=scales, flips=flips, project=p["project"], name=p["name"],
        backend=p["backend"], int8=int8_calib, env=env, progress=env.main))
    if res is None:  # another rank than 0: rank 0 reports
        return
    assert res.json_path is not None  # a project was given: predictions.json was written
    click.echo(f"{cfg.name} {split} ({res.protocol} protocol): {res.images} images, {res.poses} poses")
    click.echo(res.table())
    if cfg.yolo is not None:
        from kapao.data.yolo_labels import OKS_AREA_NOTE

        click.echo(OKS_AREA_NOTE)
    p["evaluation"].report(data, split, p["single_cls"], res.json_path)
    ms = res.timing_ms
    click.echo(f"Speed: {ms['pre']:.1f} ms pre-process, {ms['infer']:.1f} ms inference, {ms['post']:.1f} ms NMS+fusion per image")
    click.echo(f"Results saved to {res.json_path.parent}")


def _target(data: str | None, split: str | None, weights: str | None, crowdpose: bool) -> tuple[str, str, str]:
    """The dataset, split and weights to evaluate: the options given, --crowdpose's, else coco val with
    kapao_s_coco."""
    if crowdpose:
        if data not in (None, "crowdpose"):
            raise click.UsageError(f"--crowdpose means --data crowdpose; it contradicts --data {data}")
        data, split = "crowdpose", split or "test"
        weights = weights or "kapao_s_crowdpose"
    return data or "coco", split or "val", weights or "kapao_s_coco"
