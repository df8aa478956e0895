"""A restricted unpickler for official KAPAO checkpoints: pickled YOLOv5 modules become inert
:class:`StandIn` objects, and anything that could run code is refused (see :class:`RestrictedUnpickler`)."""
from __future__ import annotations

import _compat_pickle
import importlib
import pickle
import types
from collections import OrderedDict
from typing import Any, Callable

import torch


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
    "models.yolo": frozenset({"Model", "DetectionModel", "Detect"}),  # DetectionModel: YOLOv5 v7.0 files
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
        cls = type(name, (StandIn,), {"qualname": qualname, "__module__": "kapao.weights.standins"})
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
