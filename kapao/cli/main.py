"""The `kapao` command: the click group, its error policy (one line per error, the exit codes, --verbose)
and logging, set up once here. The verbs live one module per group: :mod:`kapao.cli.predict` (predict,
track), :mod:`kapao.cli.val`, :mod:`kapao.cli.train`, :mod:`kapao.cli.export` (export, info) and
:mod:`kapao.cli.data` (check, convert); shared option types and groups in :mod:`kapao.cli.options`."""
from __future__ import annotations

import sys

import click

from kapao.cli.data import check, convert
from kapao.cli.export import export, info
from kapao.cli.predict import predict, track
from kapao.cli.train import train
from kapao.cli.val import val
from kapao.errors import KapaoError
from kapao.runtime import quiet_third_party, setup_logging
from kapao.version import __version__


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
        except Exception as e:  # the one place that turns any error into one line
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
    setup_logging(verbose)


for _verb in (predict, track, val, train, check, convert, export, info):
    cli.add_command(_verb)


def main() -> None:
    quiet_third_party()
    cli(obj={})


if __name__ == "__main__":
    main()
