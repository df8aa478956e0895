"""Named weights: one table (:data:`REGISTRY`) of the official KAPAO files, the cache folder they live
in, and their download.

The table feeds everything that mentions named weights: :func:`resolve_weights` and the loaders,
the ``--weights`` help text, ``kapao info --weights NAME``, the default inference size of
:class:`kapao.infer.predictor.KAPAO`, and the README's weights table (a test checks that they agree).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from kapao.cfg.schema import KeypointSchema
from kapao.errors import WeightsError

DEFAULT_IMGSZ = 1280  # the paper's input size, used when weights do not name their own
# Direct-download form of a public Drive file (what a mirror template replaces); `confirm=t` skips
# the "can't scan for viruses" page.
DEFAULT_URL_TEMPLATE = "https://drive.usercontent.google.com/download?id={id}&export=download&confirm=t"
MANUAL_URL_TEMPLATE = "https://drive.google.com/file/d/{id}/view"
URL_ENV = "KAPAO_WEIGHTS_URL"  # URL template with {id} and/or {name}, e.g. for a mirror or a test server
DIR_ENV = "KAPAO_WEIGHTS_DIR"  # weights cache folder, overrides the default one

_PACKAGE_DIR = Path(__file__).resolve().parent.parent  # the `kapao` package folder

PathLike = str | os.PathLike


@dataclass(frozen=True)
class WeightsEntry:
    """One official KAPAO weights file: where it comes from and what it is.

    ``ap`` is the AP the official README publishes for it on ``benchmark`` (None if none is stated);
    ``file_bytes`` the file size when known (None: not recorded).
    """

    name: str  # kapao_{size}_{dataset}; the cached file is <name>.pt
    size: str  # network size: s, m, l
    dataset: str  # built-in dataset it was trained on, which fixes its keypoint schema
    gdrive_id: str  # Google Drive file id (from the official data/scripts/download_models.py)
    ap: float | None
    benchmark: str  # what `ap` was measured on
    imgsz: int = DEFAULT_IMGSZ  # input size it was trained and evaluated at
    file_bytes: int | None = None

    @property
    def url(self) -> str:
        """Direct download URL on Google Drive."""
        return DEFAULT_URL_TEMPLATE.format(id=self.gdrive_id)

    @property
    def page_url(self) -> str:
        """The Drive page to download it from in a browser."""
        return MANUAL_URL_TEMPLATE.format(id=self.gdrive_id)

    @property
    def schema(self) -> KeypointSchema:
        """The keypoint schema of its dataset (COCO: 17 keypoints, CrowdPose: 14)."""
        return KeypointSchema.builtin(self.dataset)

    def describe(self) -> str:
        """Multi-line summary for ``kapao info --weights NAME``."""
        ap = f"{self.ap:.1f} ({self.benchmark})" if self.ap is not None else "not published"
        size = f"{self.file_bytes} bytes" if self.file_bytes is not None else "not recorded"
        return "\n".join([f"name: {self.name}", f"model size: {self.size}", f"dataset: {self.dataset} "
                          f"({self.schema.num_keypoints} keypoints)", f"input size: {self.imgsz}",
                          f"published AP: {ap}", f"Google Drive id: {self.gdrive_id}", f"url: {self.url}",
                          f"file size: {size}", f"cached as: {weights_path(self.name)}"])


_COCO_VAL = "COCO val2017, no TTA"
_CROWDPOSE_TEST = "CrowdPose test, TTA scales 0.8/1/1.2 with flip"
REGISTRY: dict[str, WeightsEntry] = {e.name: e for e in (
    WeightsEntry("kapao_s_coco", "s", "coco", "1hv0xwdbdf-Ym06Hpjy6wKyIklNmKmB99", 63.0, _COCO_VAL),
    WeightsEntry("kapao_m_coco", "m", "coco", "1B-QGa99n7ZrxkgKCQ1XHnm6j0Y-lvOQz", 68.5, _COCO_VAL),
    WeightsEntry("kapao_l_coco", "l", "coco", "1jYDfvRjhMoDf5xpMq1AuzdkFzUeLwt85", 70.6, _COCO_VAL),
    WeightsEntry("kapao_s_crowdpose", "s", "crowdpose", "1SmWwmqPwb_G6d9UPAFSUnWZ-4eaL9TTv", 63.8, _CROWDPOSE_TEST),
    WeightsEntry("kapao_m_crowdpose", "m", "crowdpose", "1IqrAk-gBdcfONrlIT6d4ndaDqnlFmT0r", 67.1, _CROWDPOSE_TEST),
    WeightsEntry("kapao_l_crowdpose", "l", "crowdpose", "146DW9ELzIBY2oDofPru446yLErxHrjJU", 68.9, _CROWDPOSE_TEST),
)}
WEIGHT_NAMES: tuple[str, ...] = tuple(REGISTRY)
DEFAULT_WEIGHTS = "kapao_s_coco"
GDRIVE_IDS: dict[str, str] = {n: e.gdrive_id for n, e in REGISTRY.items()}  # name -> Drive id


# ----------------------------------------------------------------------------------------------
# The detectors the paper starts training from

DETECTOR_RELEASE = "v5.0"  # the official KAPAO attempt_download pins this YOLOv5 release tag
DETECTOR_URL_TEMPLATE = "https://github.com/ultralytics/yolov5/releases/download/{tag}/{name}.pt"


@dataclass(frozen=True)
class DetectorEntry:
    """A COCO-pretrained YOLOv5 P6 detector of YOLOv5's v5.0 release: the start of the paper's training.

    ``sha256`` and ``file_bytes`` are None: no published checksum or byte count was found for the v5.0
    assets; a download is checked by reading it as a YOLOv5 detector of the entry's size instead.
    """

    name: str  # yolov5{size}6; the cached file is <name>.pt
    size: str  # the kapao size it starts
    sha256: str | None = None
    file_bytes: int | None = None

    @property
    def url(self) -> str:
        return DETECTOR_URL_TEMPLATE.format(tag=DETECTOR_RELEASE, name=self.name)

    @property
    def page_url(self) -> str:
        return self.url

    def describe(self) -> str:
        """Multi-line summary for ``kapao info --weights NAME``."""
        return "\n".join([f"name: {self.name}", f"YOLOv5 {DETECTOR_RELEASE} P6 object detector (COCO, 80 classes): "
                          f"the start of `kapao train --size {self.size}`", f"url: {self.url}",
                          f"sha256: {self.sha256 or 'not published'}",
                          f"file size: {self.file_bytes or 'not published'}", f"cached as: {weights_path(self.name)}"])


DETECTORS: dict[str, DetectorEntry] = {e.name: e for e in (
    DetectorEntry("yolov5s6", "s"), DetectorEntry("yolov5m6", "m"), DetectorEntry("yolov5l6", "l"),
    DetectorEntry("yolov5x6", "x"),
)}
DETECTOR_FOR_SIZE: dict[str, str] = {e.size: e.name for e in DETECTORS.values()}  # no v5.0 P6 detector for n


def native_imgsz(name: str | None) -> int:
    """The input size named weights were trained at; :data:`DEFAULT_IMGSZ` for anything else."""
    entry = REGISTRY.get(name) if name else None
    return entry.imgsz if entry else DEFAULT_IMGSZ


def weights_help() -> str:
    """The names and their published AP, for help texts: ``kapao_s_coco (63.0 AP), …``."""
    return ", ".join(f"{e.name} ({e.ap:.1f} AP)" if e.ap is not None else e.name for e in REGISTRY.values())


# ----------------------------------------------------------------------------------------------
# Cache folder


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
    return weights_dir() / f"{check_name(name)}.pt"


def check_name(name: str) -> str:
    """The bare name (without .pt) of official KAPAO weights or a starting detector; WeightsError otherwise."""
    name = name[:-3] if name.endswith(".pt") else name
    if name not in REGISTRY and name not in DETECTORS:
        raise WeightsError(f"unknown weights name '{name}'; known: {', '.join(WEIGHT_NAMES + tuple(DETECTORS))}")
    return name


def check_file(path: Path) -> None:
    """WeightsError unless ``path`` is an existing file (a missing path and a folder say so)."""
    if not path.exists():
        raise WeightsError(f"weights file not found: {path}; check the path")
    if not path.is_file():
        raise WeightsError(f"weights path {path} is a folder, not a file; pass the .pt file inside it")


def check_weights_spec(spec: PathLike) -> tuple[Path, str | None]:
    """(existing file, None) or (cache path, known name) of a weights spec, without reading or
    downloading anything; WeightsError for anything else (the CLI checks --weights with it)."""
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.is_file():
        return path, None
    bare = Path(text).name[:-3] if text.endswith(".pt") else text
    if (bare in REGISTRY or bare in DETECTORS) and (text == bare or Path(text).name == text):
        return weights_path(bare), bare
    if path.exists():
        check_file(path)  # a folder: clear error
    raise WeightsError(f"weights '{text}' not found: no such file, and not a known name "
                       f"({', '.join(WEIGHT_NAMES + tuple(DETECTORS))})")
