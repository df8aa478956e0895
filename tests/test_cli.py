"""The `kapao` command group: help, version, error handling, python -m entry point."""
from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from kapao import __version__
from kapao.cli import cli


def test_help_lists_only_real_commands():
    res = CliRunner().invoke(cli, ["--help"])
    assert res.exit_code == 0
    listed = {line.split()[0] for line in res.output.split("Commands:")[1].strip().splitlines()}
    assert listed == set(cli.commands)
    for name, cmd in cli.commands.items():  # every listed command has a working --help
        sub = CliRunner().invoke(cli, [name, "--help"])
        assert sub.exit_code == 0 and "Usage: " in sub.output, name


def test_version():
    res = CliRunner().invoke(cli, ["--version"])
    assert res.exit_code == 0 and __version__ in res.output


def test_errors_are_one_line_and_verbose_shows_traceback(tmp_path):
    argv = ["info", "--weights", str(tmp_path / "missing.pt")]
    res = CliRunner().invoke(cli, argv)
    assert res.exit_code == 1
    assert res.output.count("\n") == 1 and res.output.startswith("Error: ") and "missing.pt" in res.output
    res = CliRunner().invoke(cli, ["--verbose", *argv])
    assert res.exit_code != 0 and res.exception is not None and "missing.pt" in str(res.exception)


def test_usage_error_exit_code_2():
    res = CliRunner().invoke(cli, ["info", "--size", "q"])
    assert res.exit_code == 2 and "'q' is not one of" in res.output


def test_python_m_kapao():
    out = subprocess.run([sys.executable, "-m", "kapao", "--version"], capture_output=True, text=True, check=True)
    assert __version__ in out.stdout
