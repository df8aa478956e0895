"""Weights: kapao checkpoints (data only), official KAPAO checkpoints (read without running code),
the weights cache and its downloads, and the one entry point :func:`load_model`.

kapao checkpoint (a ``torch.save``d dict of plain data and tensors, loadable with ``weights_only=True``)::

    {"format": "kapao-checkpoint", "format_version": 1,
     "config": {"size": "s", "num_keypoints": 17, "schema": {...}},   # KapaoModel.config
     "state_dict": {"model.0.conv.conv.weight": Tensor, ...},          # the inference weights
     "extra": {"epoch": ..., "optimizer": ..., "ema": ..., "metrics": ..., "train_args": ...,
               "dataset": ..., "date": "2024-...", "kapao_version": "..."}}

Official KAPAO checkpoints (``kapao_s_coco.pt`` …) are dicts whose ``model`` entry is a pickled YOLOv5
``models.yolo.Model`` (FP16). They are read by :func:`load_official_checkpoint` through a restricted
unpickler that builds inert stand-ins instead of those classes; see its docstring.
"""
from __future__ import annotations

import _compat_pickle
import contextlib
import errno
import http.client
import http.cookiejar
import importlib
import math
import os
import pickle
import re
import sys
import types
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections import OrderedDict
from datetime import datetime, timezone
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from kapao.config import STRIDES, KeypointSchema, load_dataset_config
from kapao.errors import ConfigError, WeightsError
from kapao.runtime import atomic_write

CHECKPOINT_FORMAT = "kapao-checkpoint"
CHECKPOINT_VERSION = 1

# Official KAPAO weights on Google Drive (ids from the official data/scripts/download_models.py).
GDRIVE_IDS: dict[str, str] = {
    "kapao_s_coco": "1hv0xwdbdf-Ym06Hpjy6wKyIklNmKmB99",
    "kapao_m_coco": "1B-QGa99n7ZrxkgKCQ1XHnm6j0Y-lvOQz",
    "kapao_l_coco": "1jYDfvRjhMoDf5xpMq1AuzdkFzUeLwt85",
    "kapao_s_crowdpose": "1SmWwmqPwb_G6d9UPAFSUnWZ-4eaL9TTv",
    "kapao_m_crowdpose": "1IqrAk-gBdcfONrlIT6d4ndaDqnlFmT0r",
    "kapao_l_crowdpose": "146DW9ELzIBY2oDofPru446yLErxHrjJU",
}
WEIGHT_NAMES: tuple[str, ...] = tuple(GDRIVE_IDS)
DEFAULT_WEIGHTS = "kapao_s_coco"
# Direct-download form of a public Drive file; `confirm=t` skips the "can't scan for viruses" page.
DEFAULT_URL_TEMPLATE = "https://drive.usercontent.google.com/download?id={id}&export=download&confirm=t"
MANUAL_URL_TEMPLATE = "https://drive.google.com/file/d/{id}/view"
URL_ENV = "KAPAO_WEIGHTS_URL"  # URL template with {id} and/or {name}, e.g. for a mirror or a test server
DIR_ENV = "KAPAO_WEIGHTS_DIR"  # weights cache folder, overrides the default one

_PACKAGE_DIR = Path(__file__).resolve().parent
_DOWNLOAD_TIMEOUT = 60.0  # seconds without data before a download is given up
_CHUNK = 1 << 20
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}

PathLike = str | os.PathLike


# ==============================================================================================
# kapao checkpoints: save (atomic) and load (weights only)


def save_checkpoint(path: PathLike, model: nn.Module, *, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` (state_dict + ``model.config``) and ``extra`` plain data to ``path`` atomically.

    ``extra`` holds training state such as ``epoch``, ``optimizer`` (a state_dict), ``scaler``, ``ema``
    (a state_dict), ``metrics``, ``train_args``, ``dataset``; ``date`` and ``kapao_version`` are added
    when missing. Only plain data is accepted (dict, list, tuple, str, int, float, bool, None, tensors;
    Paths become strings, numpy scalars/arrays numbers/tensors, nn.Modules their state_dict), so the
    file loads with ``torch.load(weights_only=True)``. ``state_dict`` holds the weights to infer with
    (a trainer with EMA should pass the EMA model as ``model``).

    The file is written to a temporary file in the same folder, flushed, fsync'ed and moved over
    ``path`` with ``os.replace``: a crash or a full disk leaves the previous file intact and no
    temporary file behind (the error is a WeightsError naming the path).
    """
    from kapao.version import __version__

    path = Path(path)
    model = getattr(model, "module", model)  # DistributedDataParallel / DataParallel
    model = getattr(model, "_orig_mod", model)  # torch.compile
    config = dict(getattr(model, "config", None) or {})
    if "size" not in config:
        raise WeightsError(f"cannot save {path}: the model has no 'config' with its size; save a kapao model")
    schema = getattr(model, "schema", None)
    if "schema" not in config and isinstance(schema, KeypointSchema):
        config["schema"] = schema.to_dict()
    if "num_keypoints" not in config and getattr(model, "num_keypoints", None) is not None:
        config["num_keypoints"] = int(model.num_keypoints)
    extra = dict(extra or {})
    extra.setdefault("date", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    extra.setdefault("kapao_version", __version__)
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "config": _plain(config, "config"),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": _plain(extra, "extra"),
    }
    _atomic_torch_save(ckpt, path)
    return path


def _plain(obj: Any, where: str) -> Any:
    """A copy of ``obj`` with only weights-only-loadable types; raises WeightsError naming the culprit."""
    if obj is None:
        return None
    for t in (bool, int, float, str):  # exact types: np.float64, enums etc. are subclasses
        if isinstance(obj, t):
            return t(obj)
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, nn.Module):  # e.g. the EMA model: stored as its state_dict
        return {k: v.detach().cpu() for k, v in obj.state_dict().items()}
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if type(obj).__module__ == "numpy":
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray) and obj.dtype != object:
            return torch.from_numpy(obj.copy())
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise WeightsError(f"cannot save checkpoint: {where} has a key {k!r} of type "
                                   f"{type(k).__name__}; keys must be str or int")
            out[k] = _plain(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise WeightsError(f"cannot save checkpoint: {where} is a {type(obj).__module__}.{type(obj).__qualname__}; "
                       "checkpoints hold plain data only (dict, list, str, numbers, tensors) — convert it first")


def _atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save via :func:`kapao.runtime.atomic_write`; a failure is a WeightsError naming the path."""
    try:
        with atomic_write(path) as f:
            torch.save(obj, f)
    except OSError as e:
        raise WeightsError(f"could not write checkpoint {path}: {e.strerror or e}; the previous file (if any) "
                           "is unchanged — free disk space or choose another folder") from e


def load_checkpoint(path: PathLike) -> dict[str, Any]:
    """Load a kapao checkpoint with ``torch.load(weights_only=True, map_location='cpu')``.

    Returns the dict described in the module docstring. Raises WeightsError (with the path and what
    to do) for a missing file, a truncated/corrupt file, or a file that is not a kapao checkpoint
    (an official KAPAO file included: load those with :func:`load_model`).
    """
    path = Path(path)
    try:
        obj = _torch_load_weights_only(path)
    except _PickledObjects as e:
        raise WeightsError(f"{path} is not a kapao checkpoint: it holds pickled Python objects ({e.name}) "
                           "instead of plain data; official KAPAO checkpoints load with load_model() / "
                           "--weights, which reads them without running code") from None
    if not is_kapao_checkpoint(obj):
        raise WeightsError(f"{path} is not a kapao checkpoint (no '{CHECKPOINT_FORMAT}' marker); "
                           "kapao checkpoints are written by `kapao train` — use load_model()/--weights for "
                           "official KAPAO files and plain state_dicts")
    if int(obj.get("format_version", 0)) > CHECKPOINT_VERSION:
        raise WeightsError(f"{path} is a kapao checkpoint of format version {obj['format_version']}, newer than "
                           f"this kapao supports ({CHECKPOINT_VERSION}); upgrade kapao")
    return obj


def is_kapao_checkpoint(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT
            and isinstance(obj.get("state_dict"), Mapping) and isinstance(obj.get("config"), Mapping))


class _PickledObjects(WeightsError):
    """The file holds pickled Python objects (not plain data); ``name`` is the first refused global."""

    def __init__(self, path: Path, name: str):
        self.name = name
        super().__init__(f"{path} holds pickled Python objects ({name}), not plain data")


def _check_file(path: Path) -> None:
    if not path.exists():
        raise WeightsError(f"weights file not found: {path}; check the path")
    if not path.is_file():
        raise WeightsError(f"weights path {path} is a folder, not a file; pass the .pt file inside it")


def _corrupt(path: Path, e: BaseException) -> WeightsError:
    reason = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:160] or type(e).__name__
    with contextlib.suppress(OSError):
        if path.stat().st_size == 0:
            reason = "the file is empty (0 bytes)"
    return WeightsError(f"{path} is corrupt or incomplete ({reason}); delete it and copy or download it again")


def _torch_load_weights_only(path: Path) -> Any:
    _check_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL ([\w.]+)", str(e))
        if m:
            raise _PickledObjects(path, m.group(1)) from None
        raise _corrupt(path, e) from None
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:  # truncated zip, garbage bytes, empty file, unreadable ...
        if isinstance(e, PermissionError):
            raise WeightsError(f"cannot read {path}: permission denied") from None
        raise _corrupt(path, e) from None


# ==============================================================================================
# Official checkpoints: restricted unpickling into inert stand-ins


class StandIn:
    """An inert placeholder for a class allowed in an official checkpoint.

    It runs no code of the original class: unpickling only creates it and records its pickled state
    (for an ``nn.Module``: ``__dict__`` with ``_parameters``, ``_buffers``, ``_modules``, and attributes
    such as ``yaml``, ``names``, ``stride``, ``nc``, ``no``, ``na``). Subclasses carry ``qualname``.
    """

    qualname = "?"
    state: Any = None  # set by __setstate__ when the pickle BUILDs the object

    def __init__(self, *args: Any, **kwargs: Any):  # called only for REDUCE-style pickles
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], (dict, type(None))):
            state = {**(state[0] or {}), **(state[1] or {})}  # (dict state, slot state)
        self.state = state if isinstance(state, dict) else {"__state__": state}

    def get(self, key: str, default: Any = None) -> Any:
        return self.state.get(key, default) if isinstance(self.state, dict) else default

    @property
    def children(self) -> dict[str, Any]:
        return dict(self.get("_modules") or {})

    def __repr__(self) -> str:
        return f"<stand-in {self.qualname}>"


_STANDIN_NAMES: dict[str, frozenset[str]] = {
    "models.yolo": frozenset({"Model", "Detect"}),
    "models.common": frozenset({"Focus", "Conv", "C3", "Bottleneck", "SPP", "SPPF", "Concat",
                                "BottleneckCSP", "DWConv"}),
    "utils.activations": frozenset({"SiLU", "Hardswish"}),  # YOLOv5's own, for torch < 1.7
    "torch.nn.modules.conv": frozenset({"Conv2d"}),
    "torch.nn.modules.batchnorm": frozenset({"BatchNorm2d"}),
    "torch.nn.modules.activation": frozenset({"SiLU", "LeakyReLU", "Hardswish", "ReLU"}),
    "torch.nn.modules.pooling": frozenset({"MaxPool2d"}),
    "torch.nn.modules.upsampling": frozenset({"Upsample"}),
    "torch.nn.modules.container": frozenset({"Sequential", "ModuleList"}),
    "torch.nn.modules.linear": frozenset({"Identity"}),
}


def _standin(module: str, name: str, cache: dict[str, type[StandIn]]) -> type[StandIn]:
    """The stand-in class for ``module.name``, created once per load (``cache`` belongs to one
    unpickler), so that nothing a file does to a class object can outlive that load."""
    qualname = f"{module}.{name}"
    cls = cache.get(qualname)
    if cls is None:
        cls = type(name, (StandIn,), {"qualname": qualname, "__module__": __name__ + ".standins"})
        cache[qualname] = cls
    return cls


def _encode_latin1(obj: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes; other codecs are refused."""
    if encoding.lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1", "utf-8", "ascii"):
        raise _Refused(f"_codecs.encode({encoding!r})")
    return obj.encode(encoding, errors)


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """``copyreg._reconstructor`` (protocol 0/1 objects), for stand-ins on ``object`` only."""
    if not (isinstance(cls, type) and issubclass(cls, StandIn) and base is object and state is None):
        raise _Refused("copyreg._reconstructor")
    return cls.__new__(cls)


def _wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A fresh proxy of a Python function: a pickle's BUILD can set attributes (even ``__defaults__``)
    on the objects ``find_class`` returns, which must not reach torch's own functions."""
    def proxy(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)
    return proxy


def _allowed_function(module: str, name: str) -> Any:
    """Tensor rebuild functions and plain-data constructors; None if not allowed.

    Classes returned here are C types (their attributes cannot be set); Python functions are
    returned as fresh proxies (see :func:`_wrap`).
    """
    functions: dict[tuple[str, str], Callable[[], Callable[..., Any]]] = {
        ("torch._utils", "_rebuild_tensor"): lambda: torch._utils._rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): lambda: torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): lambda: torch._utils._rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): lambda: torch._utils._rebuild_parameter_with_state,
        ("_codecs", "encode"): lambda: _encode_latin1,
        ("copyreg", "_reconstructor"): lambda: _reconstructor,
    }
    if (module, name) in functions:
        return _wrap(functions[(module, name)]())
    types_ = {
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("collections", "OrderedDict"): OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "complex"): complex,
        ("builtins", "bytearray"): bytearray,
        ("builtins", "slice"): slice,
    }
    if (module, name) in types_:
        return types_[(module, name)]
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("_reconstruct", "scalar"):
        return getattr(_numpy_multiarray(), name)  # C functions: ndarray / numpy scalar (best_fitness)
    if module == "numpy" and name in ("ndarray", "dtype"):
        import numpy as np

        return getattr(np, name)
    return None


def _numpy_multiarray() -> types.ModuleType:
    try:
        return importlib.import_module("numpy._core.multiarray")  # numpy >= 2
    except ImportError:
        return importlib.import_module("numpy.core.multiarray")


class _Refused(pickle.UnpicklingError):
    def __init__(self, name: str):
        self.name = name
        super().__init__(f"refused global {name}")


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` resolves only an allow-list.

    Allowed: the YOLOv5/KAPAO and ``torch.nn`` layer classes an official checkpoint contains, each
    mapped to an inert :class:`StandIn` subclass (their real code is never imported or run); torch's
    tensor/parameter rebuild functions (storages are handed in by ``torch.load``'s own loader); a few
    plain-data constructors (OrderedDict, set, torch.Size, dtypes, numpy arrays for ``best_fitness``).
    Notably absent: anything that imports, evaluates, calls a named function or opens files.
    Everything else (``os.system``, ``builtins.eval``, ``subprocess.Popen`` …) raises.
    """

    def __init__(self, file: Any, **kwargs: Any):
        super().__init__(file, **kwargs)
        self._standins: dict[str, type[StandIn]] = {}

    def find_class(self, module: str, name: str) -> Any:
        # protocol-2 pickles written by Python 3 use Python 2 names (__builtin__.set, copy_reg ...)
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        if name in _STANDIN_NAMES.get(module, ()):
            return _standin(module, name, self._standins)
        fn = _allowed_function(module, name)
        if fn is None:
            raise _Refused(f"{module}.{name}")
        return fn


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


# The pickle_module handed to torch.load: torch subclasses its Unpickler (adding storage handling and
# persistent_load) and uses its `load` for the small headers of legacy (pre-zip) files.
restricted_pickle = types.ModuleType("kapao_restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
restricted_pickle.load = _restricted_load  # type: ignore[attr-defined]
restricted_pickle.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]


def load_official_checkpoint(path: PathLike) -> dict[str, Any]:
    """Read an official KAPAO/YOLOv5 checkpoint without executing pickled code.

    Why a restricted ``pickle_module`` for ``torch.load`` rather than torch's weights-only loader
    with allow-listed stand-ins: (1) the allow-list, the stand-in mapping and the refusal message are
    ours and do not depend on how a torch version words its errors; (2) stand-ins must be registered
    under names they do not have (``models.yolo.Model``), which the weights-only loader supports only
    through process-global ``safe_globals`` state (not thread-safe) and only in recent torch versions;
    (3) a standard ``pickle.Unpickler`` can reach callables only through ``find_class`` (GLOBAL,
    STACK_GLOBAL, INST and the copyreg extension opcodes all resolve through it) and torch's
    ``persistent_load`` (storages only), so restricting ``find_class`` to inert stand-ins and tensor
    rebuild functions closes every route to running code. ``weights_only=False`` is passed only
    because torch refuses a custom ``pickle_module`` otherwise; the restriction is ours.

    Returns the top-level dict with stand-ins in place of modules (``ckpt['model'].state['yaml']`` …).
    A refused global raises WeightsError("… refused: the file tries to run code (module.name) …").
    """
    path = Path(path)
    _check_file(path)
    try:
        obj = torch.load(path, map_location="cpu", pickle_module=restricted_pickle, weights_only=False)
    except _Refused as e:
        raise WeightsError(f"{path}: refused: the file tries to run code ({e.name}) or build objects that "
                           "official KAPAO checkpoints do not contain; nothing was executed — do not use this "
                           "file, get the weights from the official source") from None
    except RuntimeError as e:
        if "pickle_module" in str(e):  # TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 forbids custom unpicklers
            raise WeightsError(f"{path} is an official KAPAO checkpoint, which kapao reads with its own "
                               "restricted unpickler, but TORCH_FORCE_WEIGHTS_ONLY_LOAD is set; unset it, or "
                               "convert the file once with kapao.weights.convert_official()") from None
        raise _corrupt(path, e) from None
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:
        raise _corrupt(path, e) from None
    if not isinstance(obj, Mapping) or not isinstance(obj.get("ema") or obj.get("model"), StandIn):
        raise WeightsError(f"{path} is not an official KAPAO checkpoint (no pickled 'model' entry) and not a "
                           "kapao checkpoint or state_dict")
    return dict(obj)


def _walk_state_dict(node: StandIn, prefix: str, out: dict[str, Tensor], path: Path) -> None:
    """nn.Module.state_dict() over recorded stand-ins: parameters, persistent buffers, children."""
    non_persistent = node.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        for name, t in (node.get(group) or {}).items():
            if t is None or (group == "_buffers" and name in non_persistent):
                continue
            if not isinstance(t, Tensor):
                raise WeightsError(f"{path}: {prefix}{name} is a {type(t).__name__}, not a tensor; the file "
                                   "is not a valid KAPAO checkpoint")
            out[prefix + name] = t
    for name, child in node.children.items():
        if child is None:
            continue
        if not isinstance(child, StandIn):
            raise WeightsError(f"{path}: submodule {prefix}{name} is a {type(child).__name__}; the file is not a "
                               "valid KAPAO checkpoint")
        _walk_state_dict(child, f"{prefix}{name}.", out, path)


def _iter_standins(node: StandIn, prefix: str = "") -> Iterator[tuple[str, StandIn]]:
    yield prefix.rstrip("."), node
    for name, child in node.children.items():
        if isinstance(child, StandIn):
            yield from _iter_standins(child, f"{prefix}{name}.")


def _to_float(v: Any) -> Any:
    if isinstance(v, Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if type(v).__module__ == "numpy":
        return v.item() if getattr(v, "size", 1) == 1 else v.tolist()
    return v


def official_to_state_dict(ckpt: Mapping[str, Any],
                           path: PathLike = "<checkpoint>") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Flatten an official checkpoint (from :func:`load_official_checkpoint`) into our network's terms.

    Returns (state_dict, meta): float32 tensors keyed like :class:`kapao.model.KapaoModel`
    (``model.0.conv.conv.weight`` …, ``model.33.anchors`` in grid units; ``anchor_grid`` dropped)
    and meta = {size, num_keypoints, keypoint_names (or None), anchors (nl, na, 2) pixels as lists,
    strides, bn_eps, epoch, best_fitness}. The EMA model is used when present (as YOLOv5 does).
    """
    from kapao.model import SIZES

    path = Path(path)
    root = ckpt.get("ema") if isinstance(ckpt.get("ema"), StandIn) else ckpt.get("model")
    if not isinstance(root, StandIn) or not isinstance(root.get("_modules"), Mapping):
        raise WeightsError(f"{path}: the 'model' entry is not a pickled YOLOv5 model")
    raw: dict[str, Tensor] = {}
    _walk_state_dict(root, "", raw, path)

    # --- the head (Detect, last layer) ------------------------------------------------------------
    layers = root.children.get("model")
    detect = list(layers.children.values())[-1] if isinstance(layers, StandIn) and layers.children else None
    if not isinstance(detect, StandIn) or not detect.qualname.endswith(".Detect"):
        raise WeightsError(f"{path}: no YOLOv5 Detect layer at the end of the model; not a KAPAO checkpoint")
    head = f"model.{len(layers.children) - 1}."
    no = detect.get("no")
    nc = detect.get("nc")
    k_from_no = (int(no) - 6) / 3 if isinstance(no, int) else None
    k_from_nc = int(nc) - 1 if isinstance(nc, int) else None
    out_w = raw.get(head + "m.0.weight")
    na = int(detect.get("na") or 3)
    k_from_conv = (out_w.shape[0] / na - 6) / 3 if out_w is not None else None
    candidates = [k for k in (k_from_nc, k_from_no, k_from_conv) if k is not None]
    if not candidates or any(k != candidates[0] for k in candidates) or candidates[0] < 1 \
            or candidates[0] != int(candidates[0]):
        raise WeightsError(f"{path}: the head's class/output counts (nc={nc}, no={no}) do not describe KAPAO "
                           "keypoints (no = 6 + 3K); not a KAPAO checkpoint")
    num_keypoints = int(candidates[0])

    # --- anchors: Detect.anchors is in grid units (pixels / stride); anchor_grid is in pixels ---------
    anchors_grid = raw.get(head + "anchors")
    if anchors_grid is None:
        raise WeightsError(f"{path}: the Detect layer has no anchors buffer")
    anchors_grid = anchors_grid.float()
    stride_t = detect.get("stride")
    strides = tuple(int(s) for s in (stride_t.tolist() if isinstance(stride_t, Tensor) else STRIDES))
    if strides != tuple(STRIDES):
        raise WeightsError(f"{path}: the model's strides are {strides}, KAPAO P6 networks use {tuple(STRIDES)}")
    anchors_px = anchors_grid * torch.tensor(strides, dtype=torch.float32).view(-1, 1, 1)
    grid_px = raw.get(head + "anchor_grid")
    if grid_px is not None and grid_px.numel() == anchors_px.numel():
        if not torch.allclose(grid_px.float().view_as(anchors_px), anchors_px, rtol=1e-2, atol=0.5):
            raise WeightsError(f"{path}: Detect.anchors x stride does not equal Detect.anchor_grid; the file is "
                               "inconsistent")
    state_dict: dict[str, Tensor] = {}
    for k, v in raw.items():
        if k == head + "anchor_grid":
            continue
        state_dict[k] = v.detach().float().contiguous() if v.is_floating_point() else v.detach().clone()

    # --- size from depth/width multiples, checked against the tensors -------------------------------
    yaml = root.get("yaml") if isinstance(root.get("yaml"), Mapping) else {}
    size = None
    if "depth_multiple" in yaml and "width_multiple" in yaml:
        gd, gw = float(yaml["depth_multiple"]), float(yaml["width_multiple"])
        size = next((n for n, s in SIZES.items() if math.isclose(s.depth, gd, abs_tol=0.006)
                     and math.isclose(s.width, gw, abs_tol=0.006)), None)
        if size is None:
            raise WeightsError(f"{path}: depth/width multiples {gd}/{gw} match no kapao size "
                               f"({', '.join(f'{n}={s.depth}/{s.width}' for n, s in SIZES.items())})")
    inferred = infer_size(state_dict)
    if size is None:
        size = inferred
    elif inferred is not None and inferred != size:
        raise WeightsError(f"{path}: yaml says size {size} but the tensors have the shapes of size {inferred}")
    if size is None:
        raise WeightsError(f"{path}: cannot tell the model size (s/m/l) from the checkpoint")

    # --- keypoint names from the class names (['person', kp1, ..., kpK]) --------------------------
    names = root.get("names")
    if isinstance(names, Mapping):  # newer YOLOv5 stores {index: name}
        names = [names[i] for i in sorted(names)]
    kp_names = None
    if isinstance(names, (list, tuple)) and len(names) == num_keypoints + 1 \
            and not all(str(n).isdigit() for n in names):
        kp_names = [str(n) for n in names[1:]]

    bn_eps = {p: float(n.get("eps")) for p, n in _iter_standins(root)
              if n.qualname.endswith("BatchNorm2d") and isinstance(n.get("eps"), float)}
    acts = {n.qualname.rsplit(".", 1)[-1] for p, n in _iter_standins(root) if p.endswith(".act")}
    if acts - {"SiLU"}:
        raise WeightsError(f"{path}: the model uses {', '.join(sorted(acts - {'SiLU'}))} activations; kapao "
                           "networks use SiLU (YOLOv5 v4.0+), so these weights cannot be used")
    best = ckpt.get("best_fitness")
    meta = {
        "size": size,
        "num_keypoints": num_keypoints,
        "keypoint_names": kp_names,
        "anchors": anchors_px.tolist(),
        "strides": list(strides),
        "bn_eps": bn_eps,
        "epoch": ckpt.get("epoch") if isinstance(ckpt.get("epoch"), int) else None,
        "best_fitness": _to_float(best) if best is not None else None,
    }
    return state_dict, meta


def convert_official(src: PathLike, dst: PathLike) -> Path:
    """Rewrite an official checkpoint as a kapao checkpoint (plain data, loadable weights-only)."""
    state_dict, info = _read_official(Path(src))
    model = _build_and_load(state_dict, info, Path(src), "cpu")
    extra = {"source": str(src), "epoch": info.get("epoch"), "best_fitness": info.get("best_fitness"),
             "converted_from": "official KAPAO checkpoint"}
    return save_checkpoint(dst, model, extra=extra)


# ==============================================================================================
# Interpreting state dicts


def infer_size(state_dict: Mapping[str, Tensor]) -> str | None:
    """The size whose width (stem channels) and depth (bottlenecks of layer 2) match the tensors."""
    from kapao.model import SIZES

    stem = state_dict.get("model.0.conv.conv.weight")
    if stem is None:
        return None
    n_bottlenecks = len({k.split(".")[3] for k in state_dict if k.startswith("model.2.m.")})
    for name, s in SIZES.items():
        if s.channels(64) == stem.shape[0] and s.repeats(3) == n_bottlenecks:
            return name
    return None


def infer_num_keypoints(state_dict: Mapping[str, Tensor]) -> int | None:
    """K from the head's output conv: channels = na * (6 + 3K)."""
    heads = [k for k in state_dict if re.fullmatch(r"model\.\d+\.m\.0\.weight", k)]
    if not heads:
        return None
    key = max(heads, key=lambda k: int(k.split(".")[1]))
    anchors = state_dict.get(key.rsplit(".m.0.", 1)[0] + ".anchors")
    na = anchors.shape[1] if anchors is not None and anchors.ndim == 3 else 3
    c = state_dict[key].shape[0]
    if c % na or (c // na - 6) % 3 or c // na <= 6:
        return None
    return (c // na - 6) // 3


def schema_for(num_keypoints: int, names: Sequence[str] | None = None) -> KeypointSchema:
    """A keypoint schema for weights with K keypoints and (optionally) known keypoint names.

    Names equal to a built-in dataset's give that dataset's schema (flip pairs, sigmas, skeleton);
    other names get left/right flip pairs by name and the default sigma; no names give
    :func:`kapao.model.default_schema` (COCO for 17, CrowdPose for 14, else generic).
    """
    from kapao.config import BUILTIN_DATASETS, DEFAULT_SIGMA
    from kapao.model import default_schema

    if names is None:
        return default_schema(num_keypoints)
    names = tuple(names)
    for dataset in BUILTIN_DATASETS:
        schema = load_dataset_config(dataset).schema
        if schema.names == names:
            return schema
    index = {n: i for i, n in enumerate(names)}
    flip = []
    for i, n in enumerate(names):
        for a, b in (("left", "right"), ("right", "left")):
            if a in n and n.replace(a, b) in index:
                flip.append(index[n.replace(a, b)])
                break
        else:
            flip.append(i)
    if any(flip[flip[i]] != i for i in range(len(flip))):
        flip = list(range(len(names)))
    return KeypointSchema(names=names, flip_index=tuple(flip), sigmas=(DEFAULT_SIGMA,) * len(names))


def check_compatible(model_schema: KeypointSchema, data_schema: KeypointSchema, *, what: str = "the weights") -> None:
    """Raise WeightsError if the model and the data have different keypoint counts (warn on names)."""
    km, kd = model_schema.num_keypoints, data_schema.num_keypoints
    if km != kd:
        raise WeightsError(f"{what} predict {km} keypoints ({_short(model_schema.names)}) but the data has {kd} "
                           f"({_short(data_schema.names)}); use weights trained for these {kd} keypoints, or train "
                           "new ones (`kapao train --weights` transfers the layers that fit)")
    if model_schema.names != data_schema.names and not all(n.startswith("kp") for n in model_schema.names):
        warnings.warn(f"{what} name their {km} keypoints {_short(model_schema.names)}, the data "
                      f"{_short(data_schema.names)}; assuming they are the same keypoints in the same order",
                      stacklevel=2)


def _short(names: Sequence[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (", …" if len(names) > n else "")


def transfer_weights(model: nn.Module, state_dict: Mapping[str, Tensor], *,
                     exclude: Sequence[str] = ()) -> tuple[int, int]:
    """Copy every tensor of ``state_dict`` whose key and shape match ``model``'s (training init).

    Keys containing any of ``exclude`` are skipped (e.g. ``("anchors",)`` to keep the model's own
    anchors). Returns (number transferred, number of entries in the model's state_dict).
    """
    own = model.state_dict()
    matched = {k: v for k, v in state_dict.items()
               if k in own and isinstance(v, Tensor) and v.shape == own[k].shape and not any(x in k for x in exclude)}
    model.load_state_dict(matched, strict=False)
    return len(matched), len(own)


# ==============================================================================================
# Loading any weights into a model


def load_weights(spec: PathLike, *, schema: KeypointSchema | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The float32 state_dict and info of a weights spec (see :func:`load_model`), without a model."""
    path, name = resolve_weights(spec)
    try:
        obj = _torch_load_weights_only(path)
    except _PickledObjects:  # pickled modules: an official checkpoint (or worse), read restricted
        state_dict, info = _read_official(path)
    else:
        state_dict, info = _interpret_data(obj, path)
    info.update(path=str(path), name=name)
    if name is not None:  # a named official weight: its dataset's schema
        named = load_dataset_config(name.rsplit("_", 1)[1]).schema
        check_compatible(info["schema"], named, what=f"{path}")
        info["schema"] = named
    if schema is not None:
        check_compatible(info["schema"], schema, what=f"the weights {path}")
        if info["schema"].names != schema.names and all(n.startswith("kp") for n in info["schema"].names):
            info["schema"] = schema  # unnamed keypoints take the data's names
    info["num_keypoints"] = info["schema"].num_keypoints
    info["keypoint_names"] = list(info["schema"].names)
    return state_dict, info


def _interpret_data(obj: Any, path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A weights-only-loaded object: a kapao checkpoint or a (wrapped) plain state_dict."""
    if is_kapao_checkpoint(obj):
        if int(obj.get("format_version", 0)) > CHECKPOINT_VERSION:
            raise WeightsError(f"{path}: kapao checkpoint format {obj['format_version']} is newer than this "
                               "kapao supports; upgrade kapao")
        config = dict(obj["config"])
        try:
            schema = (KeypointSchema.from_dict(config["schema"], where=f"{path} config") if config.get("schema")
                      else schema_for(int(config["num_keypoints"])))
        except (KeyError, ConfigError) as e:
            raise WeightsError(f"{path}: kapao checkpoint has an invalid model config ({e})") from None
        extra = obj.get("extra") or {}
        light = {k: v for k, v in extra.items() if not _holds_tensors(v)}
        return dict(obj["state_dict"]), {"format": "kapao", "size": config.get("size"), "config": config,
                                         "schema": schema, "epoch": light.get("epoch"), "extra": light}
    sd = obj
    if isinstance(obj, Mapping) and not _is_state_dict(obj):
        sd = next((obj[k] for k in ("state_dict", "model", "ema") if _is_state_dict(obj.get(k))), None)
    if not _is_state_dict(sd):
        raise WeightsError(f"{path} is not a kapao checkpoint, an official KAPAO checkpoint or a state_dict of "
                           "tensors; pass a file written by `kapao train` or an official kapao_*.pt")
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    size, k = infer_size(sd), infer_num_keypoints(sd)
    if size is None or k is None:
        raise WeightsError(f"{path}: a state_dict, but not of a KAPAO network (cannot find the stem conv "
                           "'model.0.conv.conv.weight' or the head 'model.33.m.0.weight')")
    return sd, {"format": "state_dict", "size": size, "schema": schema_for(k), "epoch": None}


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def _holds_tensors(v: Any) -> bool:
    if isinstance(v, Tensor):
        return True
    if isinstance(v, Mapping):
        return any(_holds_tensors(x) for x in v.values())
    if isinstance(v, (list, tuple)):
        return any(_holds_tensors(x) for x in v)
    return False


def _read_official(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    state_dict, meta = official_to_state_dict(load_official_checkpoint(path), path)
    return state_dict, {"format": "official", **meta,
                        "schema": schema_for(meta["num_keypoints"], meta["keypoint_names"])}


def load_model(spec: PathLike = DEFAULT_WEIGHTS, device: Any = "cpu", *,
               schema: KeypointSchema | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Build the network for any weights spec and load them: the one entry point for weights.

    ``spec``: a kapao checkpoint, an official KAPAO checkpoint (recognised by content), a plain
    state_dict file, or a name ``kapao_{s,m,l}_{coco,crowdpose}`` (resolved in the weights cache,
    downloaded once if missing; crowdpose names use CrowdPose's schema, coco names COCO's).
    ``schema``: the keypoint schema of the data to be used; a different keypoint count raises
    WeightsError (see :func:`check_compatible`).

    Returns (model in eval mode, float32, on ``device``; info) where info has format ('kapao',
    'official', 'state_dict'), path, name, size, num_keypoints, keypoint_names, schema, epoch, and
    per format: config/extra (kapao), anchors/bn_eps/best_fitness (official).
    """
    state_dict, info = load_weights(spec, schema=schema)
    model = _build_and_load(state_dict, info, Path(info["path"]), device)
    return model, info


def _build_and_load(state_dict: dict[str, Tensor], info: dict[str, Any], path: Path, device: Any) -> nn.Module:
    from kapao.model import KapaoModel
    from kapao.runtime import select_device

    schema: KeypointSchema = info["schema"]
    config = {**(info.get("config") or {}), "size": str(info["size"]), "schema": schema.to_dict(),
              "num_keypoints": schema.num_keypoints}
    try:
        model = KapaoModel.from_config(config)
    except ConfigError as e:
        raise WeightsError(f"{path}: cannot build its network ({e})") from None
    own = model.state_dict()
    for k, v in own.items():  # very old files lack BatchNorm's counter; it is not used in eval
        if k.endswith("num_batches_tracked") and k not in state_dict:
            state_dict[k] = torch.zeros_like(v)
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own and not k.endswith("anchor_grid")]
    bad_shape = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                 if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or bad_shape:
        parts = [f"{label}: {', '.join(items[:4])}{' …' if len(items) > 4 else ''}"
                 for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad_shape))
                 if items]
        raise WeightsError(f"{path} does not fit a kapao-{info['size']} network with {info['schema'].num_keypoints} "
                           f"keypoints ({'; '.join(parts)})")
    model.load_state_dict(state_dict, strict=True)
    modules = dict(model.named_modules())
    for prefix, eps in (info.get("bn_eps") or {}).items():  # eps is not in the state_dict
        if isinstance(modules.get(prefix), nn.BatchNorm2d):
            modules[prefix].eps = eps
    dev = device if isinstance(device, torch.device) else select_device(device)
    return model.float().to(dev).eval()


# ==============================================================================================
# Weights cache and download


def weights_dir() -> Path:
    """Folder where named weights live: $KAPAO_WEIGHTS_DIR, else ``weights/`` of a source checkout
    (the folder next to the ``kapao`` package), else the user cache (``$XDG_CACHE_HOME/kapao``,
    ``~/.cache/kapao``; ``%LOCALAPPDATA%\\kapao\\Cache`` on Windows, ``~/Library/Caches/kapao`` on macOS)."""
    env = os.environ.get(DIR_ENV)
    if env:
        return Path(env).expanduser()
    checkout = _PACKAGE_DIR.parent / "weights"
    if checkout.is_dir():
        return checkout
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "kapao" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "kapao"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kapao"


def weights_path(name: str) -> Path:
    """Where the named weights are (or will be) cached: ``<weights_dir>/<name>.pt``."""
    return weights_dir() / f"{_check_name(name)}.pt"


def _check_name(name: str) -> str:
    name = name[:-3] if name.endswith(".pt") else name
    if name not in GDRIVE_IDS:
        raise WeightsError(f"unknown weights name '{name}'; known: {', '.join(WEIGHT_NAMES)}")
    return name


def resolve_weights(spec: PathLike) -> tuple[Path, str | None]:
    """(file, name or None) of a weights spec: an existing file, or a known name (downloaded if needed)."""
    path, name = check_weights_spec(spec)
    return (download_weights(name), name) if name else (path, None)


def check_weights_spec(spec: PathLike) -> tuple[Path, str | None]:
    """(existing file, None) or (cache path, known name) of a weights spec, without reading or
    downloading anything; WeightsError for anything else (the CLI checks --weights with it)."""
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.is_file():
        return path, None
    bare = Path(text).name[:-3] if text.endswith(".pt") else text
    if bare in GDRIVE_IDS and (text == bare or Path(text).name == text):
        return weights_path(bare), bare
    if path.exists():
        _check_file(path)  # a folder: clear error
    raise WeightsError(f"weights '{text}' not found: no such file, and not a known name "
                       f"({', '.join(WEIGHT_NAMES)})")


def weights_url(name: str) -> str:
    """The download URL of named weights ($KAPAO_WEIGHTS_URL with {id}/{name}, else Google Drive)."""
    name = _check_name(name)
    template = os.environ.get(URL_ENV) or DEFAULT_URL_TEMPLATE
    return template.replace("{id}", GDRIVE_IDS[name]).replace("{name}", name)


def download_weights(name: str, *, force: bool = False) -> Path:
    """Return the cached file of named weights, downloading it first if missing (or if ``force``).

    The download goes to a temporary file in the cache folder (with a progress bar), is checked
    (complete Content-Length, loads as a checkpoint) and then moved into place atomically; a failed
    or truncated download leaves nothing behind. Offline, the error names the URL to fetch by hand
    and the full path to save it as.
    """
    name = _check_name(name)
    dest = weights_path(name)
    if dest.is_file() and not force:
        return dest
    url = weights_url(name)
    manual = MANUAL_URL_TEMPLATE.format(id=GDRIVE_IDS[name]) if not os.environ.get(URL_ENV) else url
    by_hand = f"download {manual} by hand and save it as {dest}"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WeightsError(f"cannot create the weights folder {dest.parent} ({e.strerror}); set {DIR_ENV} to a "
                           f"writable folder, or {by_hand}") from None
    try:
        with atomic_write(dest, suffix=".part", check=lambda tmp: _verify_download(tmp, name, url, by_hand)) as f:
            _download(url, f, name, by_hand)
    except OSError as e:
        if isinstance(e, urllib.error.URLError):
            raise
        raise WeightsError(f"could not write {dest} ({e.strerror or e}); free disk space or set {DIR_ENV}, "
                           f"or {by_hand}") from None
    return dest


def _verify_download(tmp: Path, name: str, url: str, by_hand: str) -> None:
    try:
        load_weights(tmp)
    except WeightsError as e:
        raise WeightsError(f"the file downloaded for {name} from {url} is not usable weights ({e}); it was "
                           f"deleted — {by_hand}") from None


class _FormParser(HTMLParser):
    """Collects the download form of Google Drive's 'cannot scan for viruses' page and its links."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[tuple[str, dict[str, str]]] = []
        self.links: list[str] = []
        self._in_form = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append((a.get("action", ""), {}))
            self._in_form = True
        elif tag == "input" and self._in_form and a.get("name") and a.get("type", "hidden") == "hidden":
            self.forms[-1][1][a["name"]] = a.get("value", "")
        elif tag == "a" and a.get("href"):
            self.links.append(a["href"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._in_form = False


def _confirmation_url(page: str, url: str) -> str | None:
    """The real download URL behind a Google Drive confirmation page, or None if it has none.

    Current pages carry ``<form id="download-form" action="https://drive.usercontent.google.com/download">``
    with hidden inputs (id, export, confirm, uuid); older ones a link or text with ``confirm=<token>``.
    """
    parser = _FormParser()
    with contextlib.suppress(Exception):
        parser.feed(page)
    for action, fields in parser.forms:
        if action and ("id" in fields or "confirm" in fields):
            sep = "&" if "?" in action else "?"
            return urllib.parse.urljoin(url, action) + sep + urllib.parse.urlencode(fields)
    m = re.search(r"confirm=([0-9A-Za-z_-]+)", page)
    if m:
        parts = urllib.parse.urlsplit(url)
        query = dict(urllib.parse.parse_qsl(parts.query))
        query["confirm"] = m.group(1)
        uuid = re.search(r"uuid=([0-9A-Za-z_-]+)", page)
        if uuid:
            query["uuid"] = uuid.group(1)
        return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))
    return None


def _download(url: str, out: Any, name: str, by_hand: str) -> None:
    """Stream ``url`` into the open file ``out``, following one Google Drive confirmation page."""
    from tqdm import tqdm

    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    opener.addheaders = [("User-Agent", "kapao-weights/1 (python urllib)")]
    tried = url
    for _ in range(3):
        try:
            resp = opener.open(tried, timeout=_DOWNLOAD_TIMEOUT)
        except urllib.error.HTTPError as e:
            raise WeightsError(f"could not download {name} from {tried} (HTTP {e.code} {e.reason}); "
                               f"{by_hand}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", None) or e
            raise WeightsError(f"could not download {name} from {tried} ({reason}; offline?); {by_hand}") from None
        with resp:
            ctype = resp.headers.get("Content-Type", "")
            if ctype.startswith("text/html"):
                page = resp.read(2 << 20).decode("utf-8", "replace")
                nxt = _confirmation_url(page, resp.geturl())
                if nxt is None or nxt == tried:
                    raise WeightsError(f"Google Drive answered {tried} with a web page instead of {name}.pt (download "
                                       f"quota exceeded or link changed); {by_hand}")
                tried = nxt
                continue
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            got = 0
            try:
                with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"{name}.pt",
                          leave=True) as bar:
                    while chunk := resp.read(_CHUNK):
                        out.write(chunk)
                        got += len(chunk)
                        bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as e:
                if isinstance(e, OSError) and e.errno in _DISK_FULL:
                    raise
                raise WeightsError(f"download of {name} from {tried} broke off after {got} bytes ({e}); the partial "
                                   f"file was deleted — try again, or {by_hand}") from None
            if total is not None and got != total:
                raise WeightsError(f"download of {name} from {tried} is truncated ({got} of {total} bytes); the "
                                   f"partial file was deleted — try again, or {by_hand}")
            return
    raise WeightsError(f"Google Drive kept answering with confirmation pages for {name}; {by_hand}")
