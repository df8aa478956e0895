"""Typed option objects built from named values: a dataclass filled field by field from a mapping (click's
parameters, an API's keywords), so that an option is added in one place -- the dataclass -- and every
layer passes the object instead of restating its fields."""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, TypeVar

T = TypeVar("T")


def from_fields(cls: type[T], values: Mapping[str, Any], *, keep: Iterable[str] = (), **derived: Any) -> T:
    """An instance of dataclass `cls`, each field by its name: from `derived` (values the caller works out,
    e.g. ``save=not nosave``), else from `values`; the fields named in `keep` keep their defaults.

    Names in `values` that are no field are ignored (one set of click parameters feeds several objects).
    TypeError when `derived` or `keep` names no field of `cls`, or when a field is in none of
    `derived`, `values` and `keep` (so an option added to `cls` cannot be forgotten by a caller).
    """
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    keep = set(keep)
    unknown = sorted((set(derived) | keep) - set(names))
    if unknown:
        raise TypeError(f"{cls.__name__} has no field {', '.join(unknown)}")
    missing = [n for n in names if n not in derived and n not in values and n not in keep]
    if missing:
        raise TypeError(f"{cls.__name__}: no value for {', '.join(missing)}")
    return cls(**{n: derived[n] if n in derived else values[n] for n in names if n not in keep})


def route_fields(values: Mapping[str, Any], *classes: type) -> list[dict[str, Any]]:
    """`values` split by field name into one dict per dataclass of `classes` (the first that has the
    field), for APIs that take an object's fields as keywords. TypeError names a key no class has, as a
    call with an unexpected keyword would."""
    out: list[dict[str, Any]] = [{} for _ in classes]
    fields = [{f.name for f in dataclasses.fields(c)} for c in classes]
    for key, value in values.items():
        i = next((i for i, names in enumerate(fields) if key in names), None)
        if i is None:
            raise TypeError(f"unexpected keyword argument {key!r}")
        out[i][key] = value
    return out
