"""kapao.backends.metadata_fields: one metadata field, typed and bounded (more cases through parse_metadata in
tests/backends/test_runtimes.py)."""
from __future__ import annotations

import pytest

from kapao.backends.metadata_fields import json_depth, metadata_field
from kapao.errors import WeightsError


def test_json_depth_counts_nesting_and_stops_early():
    assert json_depth(1) == 0 and json_depth([]) == 1 and json_depth({"a": [[1]]}) == 3
    assert json_depth([[[[[[[[[[[[1]]]]]]]]]]]]) == 9  # counting stops past the limit (8)


@pytest.mark.parametrize("text, kind, phrase", [
    ("abc", int, "metadata k is 'abc', not int"), ("true", int, "not int"), ("[[[[[[[[[[1]]]]]]]]]]", list, "nests deeper"),
    ("x" * 70_000, str, "larger than 65536 characters"), ("1", list, "not list"),
])
def test_a_field_is_typed_and_bounded(text, kind, phrase):
    with pytest.raises(WeightsError, match="^m.onnx: ") as e:
        metadata_field({"k": text}, "m.onnx", "k", "null", kind)
    assert phrase in str(e.value)
    assert metadata_field({}, "m.onnx", "k", "[1, 2]", list) == [1, 2]
