"""The `kapao val` command (kapao.cli.val): which dataset, split and weights it evaluates."""
from __future__ import annotations

import click
import pytest

from kapao.cli.val import _target


def test_target_defaults_and_the_crowdpose_shorthand():
    assert _target(None, None, None, False) == ("coco", "val", "kapao_s_coco")
    assert _target("my.yaml", "test", "w.pt", False) == ("my.yaml", "test", "w.pt")
    assert _target(None, None, None, True) == ("crowdpose", "test", "kapao_s_crowdpose")
    assert _target("crowdpose", "val", "w.pt", True) == ("crowdpose", "val", "w.pt")  # given options stay
    with pytest.raises(click.UsageError, match="--crowdpose means --data crowdpose; it contradicts --data coco"):
        _target("coco", None, None, True)
