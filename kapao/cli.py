"""The `kapao` command: a thin click layer that parses options, builds settings and calls the library."""
from __future__ import annotations

import sys

import click

from kapao import __version__
from kapao.errors import KapaoError


class KapaoGroup(click.Group):
    """Turns library errors into one-line messages (exit 1) unless --verbose asks for the traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KapaoError as e:
            if ctx.obj and ctx.obj.get("verbose"):
                raise
            click.secho(f"Error: {e}", err=True, fg="red")
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)


@click.group(cls=KapaoGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="kapao")
@click.option("--verbose", is_flag=True, help="Show full tracebacks and debug output.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """KAPAO multi-person pose estimation: keypoints and poses as objects."""
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose


MODEL_SIZES = ["n", "s", "m", "l", "x"]  # = kapao.model.SIZES, literal so that `kapao --help` needs no torch


@cli.command()
@click.option("--size", type=click.Choice(MODEL_SIZES), default="s", show_default=True, help="Model size.")
@click.option("--kpts", type=click.IntRange(min=1), default=None,
              help="Number of keypoints (17: COCO names, 14: CrowdPose names, else kp0..kpK-1). [default: 17]")
@click.option("--data", default=None, help="Take the keypoint schema from a dataset config: coco, crowdpose or a YAML.")
@click.option("--imgsz", type=click.IntRange(min=64), default=1280, show_default=True,
              help="Square input size for the GFLOPs figure (a multiple of 64).")
def info(size: str, kpts: int | None, data: str | None, imgsz: int) -> None:
    """Print a model summary: layers, parameters, GFLOPs and keypoint names."""
    from kapao.model import build_model, format_model_info, model_info, resolve_schema

    # `--weights` (describe a checkpoint) comes with kapao/weights.py: it will build the model from
    # the checkpoint's config instead of from --size/--kpts/--data, then print the same summary.
    model = build_model(size, resolve_schema(num_keypoints=kpts, data=data))
    click.echo(format_model_info(model_info(model, imgsz)))


def main() -> None:
    cli(obj={})


if __name__ == "__main__":
    main()
