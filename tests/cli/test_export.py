"""The `kapao info` and `kapao export` commands (kapao.cli.export): info prints what kapao.weights.describe says."""
from __future__ import annotations

from click.testing import CliRunner

from kapao.cli.main import cli
from kapao.models.network import kapao_n
from kapao.weights.checkpoint import save_checkpoint
from kapao.weights.describe import describe_weights, named_weights_table


def test_info_prints_the_description_of_the_weights_line_by_line(tmp_path):
    res = CliRunner().invoke(cli, ["info", "--names"])
    assert res.exit_code == 0 and res.output == "".join(f"{line}\n" for line in named_weights_table())
    path = save_checkpoint(tmp_path / "w.pt", kapao_n(17), extra={"epoch": 2, "metrics": {"AP": 0.125}})
    res = CliRunner().invoke(cli, ["info", "--weights", str(path), "--imgsz", "128"])
    assert res.exit_code == 0, res.output
    assert res.output == "".join(f"{line}\n" for line in describe_weights(str(path), 128))
    assert "metrics: AP 0.1250" in res.output

