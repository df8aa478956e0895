"""The dataset commands `check` and `convert`, added to the `kapao` group by :mod:`kapao.cli.main`."""
from __future__ import annotations

import sys

import click

from kapao.cli.options import bad_parameter, dataset_config, must_exist
from kapao.errors import ConfigError


@click.command()
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

    try:
        report = check_dataset(data, single_cls=single_cls, splits=splits or None, samples=samples, project=project,
                               name=name)
    except ConfigError as e:  # a YAML that cannot be read as a dataset config: the --data value is wrong
        raise bad_parameter(e, ctx, "data") from None
    click.echo(format_report(report))
    click.echo(f"Samples saved to {report.save_dir}")
    if report.errors:
        sys.exit(1)


@click.command()
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

    cfg = dataset_config(ctx, data, single_cls)
    if cfg.format == to:
        raise click.UsageError(f"{data} is already in the {to} layout; use --to {'coco' if to == 'yolo' else 'yolo'}")
    try:
        res = coco_to_yolo(cfg, out, copy_images=copy_images) if to == "yolo" else yolo_to_coco(cfg, out)
    except ConfigError as e:  # --out is not a new or empty folder
        raise bad_parameter(e, ctx, "out") from None
    click.echo(res.summary())
    click.echo(f"Dataset YAML: {res.yaml_path} (use it as --data)")
