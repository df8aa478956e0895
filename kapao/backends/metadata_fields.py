"""One field of an exported file's ``metadata_props`` read and checked: a string, or bounded JSON of the
expected type; anything else is a one-line WeightsError "FILE: metadata KEY is …" (hostile metadata must
never reach the catch-all)."""
from __future__ import annotations

import json
from typing import Any, Callable, Mapping

from kapao.errors import WeightsError

MAX_METADATA_CHARS = 1 << 16  # a metadata value; the schema of K=133 keypoints is ~10 kB
MAX_METADATA_DEPTH = 8  # JSON nesting of a metadata value (the schema nests 3 deep)


def metadata_field(meta: Mapping[str, str], where: str, key: str, default: str, kind: Any,
                   check: Callable[[Any], bool] | None = None, what: str = "") -> Any:
    """`meta[key]` (or `default`) parsed as JSON (as text when `kind` is str) and checked to be a `kind`
    (a type or tuple; bool is no int) for which `check` holds; at most MAX_METADATA_CHARS characters
    and MAX_METADATA_DEPTH levels of nesting."""
    text = meta.get(key, default)
    name = what or getattr(kind, "__name__", "the expected type")
    if not isinstance(text, str) or len(text) > MAX_METADATA_CHARS:
        raise WeightsError(f"{where}: metadata {key} is larger than {MAX_METADATA_CHARS} characters; export it again")
    bad = f"{where}: metadata {key} is {text[:60]!r}, not {name}; export it again"
    try:
        value = json.loads(text) if kind is not str else text
    except ValueError:
        raise WeightsError(bad) from None
    except RecursionError:
        value = None
    if (value is None and text.lstrip()[:1] in ("[", "{")) or json_depth(value) > MAX_METADATA_DEPTH:
        raise WeightsError(f"{where}: metadata {key} nests deeper than {MAX_METADATA_DEPTH} levels; export it again")
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)) or (check is not None and not check(value)):
        raise WeightsError(bad)
    return value


def json_depth(value: Any, level: int = 0) -> int:
    """Nesting depth of parsed JSON (stops counting past MAX_METADATA_DEPTH)."""
    if level > MAX_METADATA_DEPTH or not isinstance(value, (list, dict)):
        return level
    items = value.values() if isinstance(value, dict) else value
    return max((json_depth(v, level + 1) for v in items), default=level + 1)


def check_head_shape(where: str, k: int, want: int, in_shape: list[Any], out_shape: list[Any]) -> None:
    """WeightsError unless the graph maps (B, 3, H, W) to (B, N, `want`): the head the metadata's K implies."""
    if len(out_shape) != 3 or len(in_shape) != 4 or (isinstance(out_shape[2], int) and out_shape[2] != want):
        raise WeightsError(f"{where}: metadata schema has {k} keypoints, so the graph must output (B, N, {want}) from a "
                           f"(B, 3, H, W) input, but it maps {in_shape} to {out_shape}; it is no kapao export of this schema")
