"""kapao checkpoints: plain data (state_dict + model config + metadata), saved atomically and loaded
with ``torch.load(weights_only=True)``; and reading what a state_dict describes.

A kapao checkpoint (a ``torch.save``d dict of plain data and tensors)::

    {"format": "kapao-checkpoint", "format_version": 1,
     "config": {"size": "s", "num_keypoints": 17, "schema": {...}},   # KapaoModel.config
     "state_dict": {"model.0.conv.conv.weight": Tensor, ...},          # the inference weights
     "extra": {"epoch": ..., "optimizer": ..., "ema": ..., "metrics": ..., "train_args": ...,
               "dataset": ..., "date": "2024-...", "kapao_version": "..."}}
"""
from __future__ import annotations

import contextlib
import pickle
import re
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from kapao.cfg.schema import KeypointSchema
from kapao.errors import ConfigError, WeightsError
from kapao.runtime import atomic_write, plain_data, select_device
from kapao.version import __version__
from kapao.weights.registry import PathLike, check_file

if TYPE_CHECKING:
    from kapao.models.network import KapaoModel

CHECKPOINT_FORMAT = "kapao-checkpoint"
CHECKPOINT_VERSION = 1


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
    path = Path(path)
    model = getattr(model, "module", model)  # DistributedDataParallel / DataParallel
    model = getattr(model, "_orig_mod", model)  # torch.compile
    config = dict(getattr(model, "config", None) or {})
    if "size" not in config:
        raise WeightsError(f"cannot save {path}: the model has no 'config' with its size; save a kapao model")
    schema = getattr(model, "schema", None)
    if "schema" not in config and isinstance(schema, KeypointSchema):
        config["schema"] = schema.to_dict()
    num_keypoints = getattr(model, "num_keypoints", None)
    if "num_keypoints" not in config and num_keypoints is not None:
        config["num_keypoints"] = int(num_keypoints)
    extra = dict(extra or {})
    extra.setdefault("date", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    extra.setdefault("kapao_version", __version__)
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "config": _plain(config, "config", path),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": _plain(extra, "extra", path),
    }
    _atomic_torch_save(ckpt, path)
    return path


def _plain(obj: Any, where: str, path: Path) -> Any:
    """:func:`kapao.runtime.plain_data`, its TypeError as a WeightsError naming the culprit."""
    try:
        return plain_data(obj, where)
    except TypeError as e:
        raise WeightsError(f"cannot save checkpoint {path}: {e}; checkpoints hold plain data only (dict, list, "
                           "str, numbers, tensors) — convert it first") from None


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


_MAGIC = ((b"\xff\xd8\xff", "a JPEG image"), (b"\x89PNG", "a PNG image"), (b"GIF8", "a GIF image"),
          (b"BM", "a BMP image"), (b"RIFF", "a WebP image or AVI video"), (b"\x1aE\xdf\xa3", "a video (Matroska/WebM)"),
          (b"%PDF", "a PDF document"), (b"\x1f\x8b", "a gzip archive"))


def foreign_kind(path: Path) -> str | None:
    """What a file that is not a PyTorch checkpoint is ('an ONNX model', 'a JPEG image', …), from its
    suffix and first bytes; None when it could be a (damaged) checkpoint."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return None
    if path.suffix.lower() == ".onnx" or (head[:1] == b"\x08" and b"pytorch" in head):
        return "an ONNX model"
    kind = next((k for magic, k in _MAGIC if head.startswith(magic)), None)
    if kind is None and head[4:8] == b"ftyp":
        kind = "an MP4/MOV video"
    printable = head and all(b >= 0x20 or b in b"\t\r\n" for b in head)
    if kind is None and printable and not head.lstrip().startswith(b"<"):  # HTML: a failed download, below
        kind = "a text file (JSON/YAML/…)"
    return kind


def _corrupt(path: Path, e: BaseException) -> WeightsError:
    kind = foreign_kind(path)
    if kind == "an ONNX model":
        return WeightsError(f"{path} is an ONNX model, not a checkpoint: ONNX files run with `kapao predict/val "
                            "--weights`; export, train and --resume need the .pt checkpoint it was exported from")
    if kind is not None:
        return WeightsError(f"{path} is {kind}, not a checkpoint; give a .pt file written by `kapao train` (or an "
                            "official KAPAO checkpoint)")
    reason = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:160] or type(e).__name__
    with contextlib.suppress(OSError):
        if path.stat().st_size == 0:
            reason = "the file is empty (0 bytes)"
    return WeightsError(f"{path} is truncated or corrupt ({reason}): the copy or download was cut off or damaged; "
                        "copy or download it again")


def _torch_load_weights_only(path: Path) -> Any:
    check_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL ([\w.]+)", str(e))
        if m:
            raise _PickledObjects(path, m.group(1)) from None
        raise _corrupt(path, e) from None
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - truncated zip, garbage bytes, empty file, unreadable ...
        if isinstance(e, PermissionError):
            raise WeightsError(f"cannot read {path}: permission denied") from None
        raise _corrupt(path, e) from None



# ----------------------------------------------------------------------------------------------
# Building a network for a state_dict, and what a state_dict describes


def build_and_load(state_dict: dict[str, Tensor], info: dict[str, Any], path: Path, device: Any) -> KapaoModel:
    """A :class:`kapao.models.network.KapaoModel` for ``info`` (size, schema, optional config and bn_eps) with
    ``state_dict`` loaded strictly; WeightsError naming ``path`` and the keys that do not fit."""
    from kapao.models.network import KapaoModel  # the network module is heavy; weights files need not be

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


def infer_size(state_dict: Mapping[str, Tensor]) -> str | None:
    """The size whose width (stem channels) and depth (bottlenecks of layer 2) match the tensors."""
    from kapao.models.network import SIZES

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
