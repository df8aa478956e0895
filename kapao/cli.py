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


def main() -> None:
    cli(obj={})


if __name__ == "__main__":
    main()
