"""Typed option objects built by field name (kapao.cfg.fields): what the builders take, what they refuse."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from kapao.cfg.fields import from_fields, route_fields


@dataclass(frozen=True)
class _Out:
    project: str
    name: str = "exp"
    save: bool = True
    tags: tuple[str, ...] = field(default_factory=tuple)


def test_from_fields_takes_each_field_by_name_and_derived_values_win():
    params = {"project": "runs/x", "name": "e", "save": False, "tags": ("a",), "nosave": True, "unrelated": 3}
    assert from_fields(_Out, params) == _Out("runs/x", "e", False, ("a",))  # other parameters are ignored
    assert from_fields(_Out, params, save=not params["nosave"], name="n") == _Out("runs/x", "n", False, ("a",))
    assert from_fields(_Out, {"project": "p"}, keep=("name", "save", "tags")) == _Out("p")


def test_from_fields_refuses_a_missing_field_and_unknown_names():
    with pytest.raises(TypeError, match=r"_Out: no value for save, tags"):  # an option added but not passed
        from_fields(_Out, {"project": "p", "name": "e"})
    with pytest.raises(TypeError, match=r"_Out has no field nosave"):  # a typo in a derived value
        from_fields(_Out, {"project": "p", "name": "e", "tags": ()}, nosave=True)
    with pytest.raises(TypeError, match=r"_Out has no field sav"):
        from_fields(_Out, {"project": "p"}, keep=("name", "sav", "tags"))


def test_route_fields_splits_keywords_by_class_and_refuses_strays():
    @dataclass
    class A:
        imgsz: int = 1
        batch: int = 1

    assert route_fields({"imgsz": 64, "save": False, "batch": 2}, A, _Out) == [{"imgsz": 64, "batch": 2}, {"save": False}]
    assert route_fields({}, A, _Out) == [{}, {}]
    with pytest.raises(TypeError, match="unexpected keyword argument 'imgs'"):
        route_fields({"imgs": 64}, A, _Out)

