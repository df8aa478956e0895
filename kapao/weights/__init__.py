"""Weights: kapao checkpoints (plain data), official KAPAO checkpoints (read without running code),
the table of named weights with its cache and downloads, and the one entry point :func:`load_model`.

Modules: :mod:`~kapao.weights.checkpoint` (save/load kapao checkpoints, build a network for a
state_dict), :mod:`~kapao.weights.unpickle` and :mod:`~kapao.weights.official` (official files),
:mod:`~kapao.weights.registry` (named weights, cache folder, download), :mod:`~kapao.weights.loader`
(:func:`load_weights`, :func:`load_model`).
"""
from __future__ import annotations

import importlib
from typing import Any

_HOMES: dict[str, str] = {  # public name -> the submodule that defines it
    **dict.fromkeys((
        "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "build_and_load", "check_compatible",
        "infer_num_keypoints", "infer_size", "is_kapao_checkpoint", "load_checkpoint", "save_checkpoint",
        "transfer_weights",
    ), "checkpoint"),
    **dict.fromkeys((
        "load_model", "load_weights",
    ), "loader"),
    **dict.fromkeys((
        "convert_official", "load_official_checkpoint", "official_to_state_dict",
    ), "official"),
    **dict.fromkeys((
        "DEFAULT_IMGSZ", "DEFAULT_URL_TEMPLATE", "DEFAULT_WEIGHTS", "DIR_ENV", "GDRIVE_IDS",
        "MANUAL_URL_TEMPLATE", "REGISTRY", "URL_ENV", "WEIGHT_NAMES", "WeightsEntry", "check_weights_spec",
        "download_weights", "native_imgsz", "resolve_weights", "weights_dir", "weights_help",
        "weights_path", "weights_url",
    ), "registry"),
    **dict.fromkeys((
        "RestrictedUnpickler", "StandIn", "restricted_pickle",
    ), "unpickle"),
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    """Import submodules on first use, so that the table of named weights (``kapao.weights.registry``)
    is readable without importing torch (``kapao --help`` lists it)."""
    if name not in _HOMES:
        raise AttributeError(f"module 'kapao.weights' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"kapao.weights.{_HOMES[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})
