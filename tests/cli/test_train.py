"""The `kapao train` command's parameters and TrainArgs (kapao.cli.train)."""
from __future__ import annotations

from kapao.cfg.fields import from_fields
from kapao.cli.train import train
from kapao.train.run import TrainArgs


def test_train_args_come_from_the_train_command_by_field_name():
    """Every TrainArgs field is a `kapao train` parameter of the same name or one the verb works out."""
    params = {p.name: p.default for p in train.params}
    args = from_fields(TrainArgs, params, device="", hyp_overrides={}, amp=True, plots=True)
    assert args == TrainArgs(device="", epochs=None, size=None)  # the CLI defaults are TrainArgs' own
