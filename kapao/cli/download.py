"""The `download` command: the built-in datasets (:mod:`kapao.data.download`), added to the `kapao` group
by :mod:`kapao.cli.main`."""
from __future__ import annotations

import click

from kapao.runtime import setup_logging


@click.command()
@click.argument("dataset", type=click.Choice(["coco", "crowdpose"]))
@click.argument("folder", required=False)
@click.pass_context
def download(ctx: click.Context, dataset: str, folder: str | None) -> None:
    """Download a built-in dataset into FOLDER (default: datasets/DATASET, where --data DATASET looks).

    coco: COCO 2017 keypoints (~20 GB); crowdpose: CrowdPose images and annotations. Pieces already in
    place are skipped, so an interrupted download continues with the missing ones."""
    from kapao.data.download import download_dataset

    setup_logging(ctx.obj.get("verbose", False))
    out = folder or f"datasets/{dataset}"
    fetched = download_dataset(dataset, out)
    click.echo(f"{dataset}: {len(fetched)} pieces downloaded" + ("" if fetched else " (all were in place)"))
    click.echo(f"Results saved to {out}")
