"""Training hyperparameters and inference settings (typed, validated once), and reading the YAML files
that ship with the package."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml

from kapao.errors import ConfigError

BUILTIN_HYPS = {"default": "hyp-kapao.yaml"}


def builtin_config_file(name: str) -> Path:
    """Path of a YAML that ships inside the package: the repository's top-level data/ folder, which a checkout
    sees through the kapao/configs link and a wheel holds as the kapao.configs package data."""
    return Path(str(resources.files("kapao.configs") / name))


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as e:  # a folder, no permission, …
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text (YAML) file; pass a dataset/hyperparameter YAML") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    return data


def check_hyp_spec(spec: str | os.PathLike) -> None:
    """ConfigError unless `spec` is a built-in hyperparameter set or an existing file (nothing is read)."""
    text = str(spec)
    if text not in BUILTIN_HYPS and not Path(text).expanduser().is_file():
        raise ConfigError(f"hyperparameter file not found: {text} (built-in: {', '.join(BUILTIN_HYPS)})")


# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hyp:
    """Training hyperparameters (loss gains, optimiser schedule, augmentation)."""

    # optimiser and schedule
    lr0: float = 0.01
    lrf: float = 0.2  # final lr = lr0 * lrf (cosine)
    momentum: float = 0.937
    weight_decay: float = 5e-4  # scaled by batch/nominal_batch; conv weights only
    nominal_batch: int = 64  # gradients are accumulated up to this batch size
    warmup_epochs: float = 3.0
    warmup_min_iters: int = 1000
    warmup_momentum: float = 0.8
    warmup_bias_lr: float = 0.1
    ema_decay: float = 0.9999
    ema_tau: float = 2000.0
    # loss
    box: float = 0.05
    obj: float = 0.7
    cls: float = 0.3
    kp: float = 0.025
    anchor_t: float = 4.0
    # augmentation
    hsv_h: float = 0.015
    hsv_s: float = 0.7
    hsv_v: float = 0.4
    degrees: float = 0.0
    translate: float = 0.1
    scale: float = 0.9
    shear: float = 0.0
    perspective: float = 0.0
    fliplr: float = 0.5
    mosaic: float = 1.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0 or v == float("inf"):
                raise ConfigError(f"hyperparameter '{f.name}' must be a finite non-negative number, got {v!r}")
        for name in ("fliplr", "mosaic"):
            if getattr(self, name) > 1:
                raise ConfigError(f"hyperparameter '{name}' is a probability and must be in [0, 1]")

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str = "hyp") -> "Hyp":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"{where}: unknown hyperparameter(s) {', '.join(sorted(unknown))}; known: "
                              f"{', '.join(f.name for f in dataclasses.fields(cls))}")
        for k, v in d.items():
            try:
                float(v)
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: hyperparameter '{k}' must be a number, got {v!r}") from None
        values: dict[str, Any] = {k: (int(v) if isinstance(getattr(cls, k), int) and float(v).is_integer() else float(v))
                                  for k, v in d.items()}
        return cls(**values)


def load_hyp(spec: str | os.PathLike | None = None) -> Hyp:
    """Load hyperparameters from a built-in name (`default`) or a YAML path; missing keys keep defaults."""
    text = "default" if spec is None else str(spec)
    check_hyp_spec(text)
    path = builtin_config_file(BUILTIN_HYPS[text]) if text in BUILTIN_HYPS else Path(text).expanduser()
    return Hyp.from_dict(read_yaml(path), where=str(path))


# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InferenceSettings:
    """Thresholds of decode -> NMS -> keypoint-object fusion, passed as one object."""

    conf: float = 0.7  # pose-object (person) score threshold
    iou: float = 0.45  # pose-object NMS IoU
    max_det: int = 300
    conf_kp: float = 0.5  # keypoint-object score threshold
    iou_kp: float = 0.45  # keypoint-object NMS IoU
    conf_kp_person: float = 0.2  # poses above this score take part in fusion
    tolerance: float = 25.0  # fusion distance in original-image pixels
    fuse: bool = True  # fuse keypoint objects into poses

    def __post_init__(self) -> None:
        for name in ("conf", "iou", "conf_kp", "iou_kp", "conf_kp_person"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"'{name}' must be in [0, 1], got {v}")
        if self.max_det < 1:
            raise ConfigError(f"'max_det' must be at least 1, got {self.max_det}")
        if self.tolerance < 0:
            raise ConfigError(f"'tolerance' must be non-negative, got {self.tolerance}")

    def replace(self, **changes: Any) -> "InferenceSettings":
        """A copy with the given fields changed (None values are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


PREDICT_SETTINGS = InferenceSettings()  # the official demos' thresholds
VAL_SETTINGS = InferenceSettings(conf=0.001, iou=0.65, max_det=300, conf_kp=0.2, iou_kp=0.25,
                                 conf_kp_person=0.3, tolerance=50.0)


# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OneEuroSettings:
    """Parameters of the One Euro filter that smooths tracked keypoints (kapao.track.smooth).

    Defaults from scripts/benchmark_smoothing.py: at 25, 30 and 60 fps, the least frame-to-frame jitter
    among settings whose mean RMS error to the truth is no worse than the raw keypoints' and whose lag
    on a fast move is under 20 ms (the measurements: README, "Video: tracking and smoothing").

    min_cutoff: Hz, cutoff at rest (lower = smoother, more lag when slow).
    beta:       cutoff increase per unit speed, in Hz per (person height / s) (higher = less lag on fast moves).
    d_cutoff:   Hz, cutoff of the low-pass on the speed estimate itself.
    """

    min_cutoff: float = 0.5
    beta: float = 10.0
    d_cutoff: float = 1.0

    def __post_init__(self) -> None:
        for name in ("min_cutoff", "d_cutoff"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"smoothing '{name}' must be > 0 Hz, got {getattr(self, name)}")
        if not self.beta >= 0:
            raise ConfigError(f"smoothing 'beta' must be >= 0, got {self.beta}")
