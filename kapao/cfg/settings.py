"""Training hyperparameters and inference settings (typed, validated once), and reading the YAML files
that ship with the package."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from kapao.errors import ConfigError

BUILTIN_HYPS = {"default": "hyp-kapao.yaml"}


def builtin_config_file(name: str) -> Path:
    """Path of a YAML that ships inside the package: the repository's top-level data/ folder, which a checkout
    sees through the kapao/configs link and a wheel holds as the kapao.configs package data."""
    return Path(str(resources.files("kapao.configs") / name))


MAX_YAML_BYTES = 1 << 20  # every YAML kapao reads (datasets, hyps, trackers, args.yaml) is a few KB
MAX_YAML_NODES = 100_000
MAX_YAML_DEPTH = 64


def read_yaml(path: Path) -> dict[str, Any]:
    """The one YAML reader: a mapping read from `path` with safe loading, refused in one ConfigError line
    (within milliseconds) when it is not a regular text file, larger than MAX_YAML_BYTES, uses aliases
    (`*name`: how a "billion laughs" file blows up; no kapao file needs them), holds more than
    MAX_YAML_NODES values or nests deeper than MAX_YAML_DEPTH. Tags that would run code are refused by
    the safe loader."""
    path = Path(path)
    try:
        if path.exists() and not path.is_file() and not path.is_dir():
            raise ConfigError(f"{path}: not a regular file; pass a YAML file")
        with open(path, "rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)
        if len(raw) > MAX_YAML_BYTES:
            raise ConfigError(f"{path}: larger than {MAX_YAML_BYTES >> 20} MiB, far more than any config; "
                              "pass a dataset/hyperparameter YAML")
        text = raw.decode("utf-8-sig")
        _check_yaml_events(text, path)
        data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as e:  # a folder, no permission, …
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    except (UnicodeDecodeError, ValueError) as e:  # ValueError: a NUL or other character YAML refuses
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{path}: not a text (YAML) file; pass a dataset/hyperparameter YAML") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    return data


def _check_yaml_events(text: str, path: Path) -> None:
    """Refuse aliases, too many values and deep nesting from the parser's event stream (no object is built)."""
    nodes = depth = 0
    for event in yaml.parse(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
        if isinstance(event, yaml.AliasEvent):
            raise ConfigError(f"{path}: uses the YAML alias *{event.anchor}; kapao reads no aliases or anchors "
                              "(they can expand a small file into billions of values); write the values out")
        if isinstance(event, (yaml.ScalarEvent, yaml.CollectionStartEvent)):
            nodes += 1
            depth += isinstance(event, yaml.CollectionStartEvent)
            if nodes > MAX_YAML_NODES or depth > MAX_YAML_DEPTH:
                what = f"more than {MAX_YAML_NODES} values" if nodes > MAX_YAML_NODES else \
                    f"nesting deeper than {MAX_YAML_DEPTH} levels"
                raise ConfigError(f"{path}: {what}, far more than any config; pass a dataset/hyperparameter YAML")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


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
THRESHOLD_KEYWORDS = tuple(f.name for f in dataclasses.fields(InferenceSettings))  # conf=, iou=, … of the API


def settings_from_keywords(base: InferenceSettings, keywords: dict[str, Any], verb: str,
                           allowed: Sequence[str] = ()) -> tuple[InferenceSettings, dict[str, Any]]:
    """(`base` with the threshold keywords of `keywords` applied, the other keywords), as ``KAPAO.<verb>``
    takes them (``model.predict(src, conf=0.3, iou=0.5)``); TypeError naming ``KAPAO.<verb>()`` for a keyword
    that is neither a threshold nor in `allowed`, ConfigError for an out-of-range value."""
    unknown = sorted(k for k in keywords if k not in THRESHOLD_KEYWORDS and k not in allowed)
    if unknown:
        raise TypeError(f"KAPAO.{verb}() got an unexpected keyword argument {unknown[0]!r}; it takes "
                        f"{', '.join(sorted({*THRESHOLD_KEYWORDS, *allowed}))}")
    thresholds = {k: v for k, v in keywords.items() if k in THRESHOLD_KEYWORDS}
    return base.replace(**thresholds), {k: v for k, v in keywords.items() if k not in THRESHOLD_KEYWORDS}
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
