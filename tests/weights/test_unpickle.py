"""The restricted unpickler on its own: unknown classes refused, plain containers and bytes read back."""
from __future__ import annotations

import pytest

from kapao.weights.unpickle import RestrictedUnpickler


class _Harmless:
    pass


def test_restricted_unpickler_refuses_unknown_classes():
    import io
    import pickle

    data = pickle.dumps({"x": _Harmless()}, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="_Harmless"):
        RestrictedUnpickler(io.BytesIO(data)).load()
    ok = pickle.dumps({"s": {1, 2}, "b": b"\x00\xff", "o": __import__("collections").OrderedDict(a=1)}, protocol=2)
    assert RestrictedUnpickler(io.BytesIO(ok)).load() == {"s": {1, 2}, "b": b"\x00\xff", "o": {"a": 1}}
