"""The dataset commands (kapao.cli.data): `kapao convert` to the layout a dataset already has."""
from __future__ import annotations

from click.testing import CliRunner

from kapao.cli.main import cli


def test_convert_to_the_layout_the_dataset_has_is_a_usage_error(coco_mini_yaml, tmp_path):
    res = CliRunner().invoke(cli, ["convert", "--data", str(coco_mini_yaml), "--to", "coco", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "is already in the coco layout; use --to yolo" in res.output
    assert not (tmp_path / "o").exists()
