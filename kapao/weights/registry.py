"""Named weights: one table (:data:`REGISTRY`) of the official KAPAO files, the cache folder they live
in, and their download.

The table feeds everything that mentions named weights: :func:`resolve_weights` and the loaders,
the ``--weights`` help text, ``kapao info --weights NAME``, the default inference size of
:class:`kapao.infer.predictor.KAPAO`, and the README's weights table (a test checks that they agree).
"""
from __future__ import annotations

import contextlib
import errno
import http.client
import io
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kapao.cfg.schema import KeypointSchema
from kapao.errors import WeightsError
from kapao.runtime import atomic_write

DEFAULT_IMGSZ = 1280  # the paper's input size, used when weights do not name their own
# Direct-download form of a public Drive file (what a mirror template replaces); `confirm=t` skips
# the "can't scan for viruses" page.
DEFAULT_URL_TEMPLATE = "https://drive.usercontent.google.com/download?id={id}&export=download&confirm=t"
MANUAL_URL_TEMPLATE = "https://drive.google.com/file/d/{id}/view"
URL_ENV = "KAPAO_WEIGHTS_URL"  # URL template with {id} and/or {name}, e.g. for a mirror or a test server
DIR_ENV = "KAPAO_WEIGHTS_DIR"  # weights cache folder, overrides the default one

_PACKAGE_DIR = Path(__file__).resolve().parent.parent  # the `kapao` package folder
_DOWNLOAD_TIMEOUT = 60.0  # seconds without data before a download is given up
_CHUNK = 1 << 20
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}

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
    return weights_dir() / f"{_check_name(name)}.pt"


def _check_name(name: str) -> str:
    name = name[:-3] if name.endswith(".pt") else name
    if name not in REGISTRY:
        raise WeightsError(f"unknown weights name '{name}'; known: {', '.join(WEIGHT_NAMES)}")
    return name


def _check_file(path: Path) -> None:
    """WeightsError unless ``path`` is an existing file (a missing path and a folder say so)."""
    if not path.exists():
        raise WeightsError(f"weights file not found: {path}; check the path")
    if not path.is_file():
        raise WeightsError(f"weights path {path} is a folder, not a file; pass the .pt file inside it")


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
    if bare in REGISTRY and (text == bare or Path(text).name == text):
        return weights_path(bare), bare
    if path.exists():
        _check_file(path)  # a folder: clear error
    raise WeightsError(f"weights '{text}' not found: no such file, and not a known name "
                       f"({', '.join(WEIGHT_NAMES)})")


# ----------------------------------------------------------------------------------------------
# Download


def weights_url(name: str) -> str:
    """The download URL of named weights ($KAPAO_WEIGHTS_URL with {id}/{name}, else Google Drive)."""
    entry = REGISTRY[_check_name(name)]
    template = os.environ.get(URL_ENV)
    return template.replace("{id}", entry.gdrive_id).replace("{name}", entry.name) if template else entry.url


def download_weights(name: str, *, force: bool = False) -> Path:
    """Return the cached file of named weights, downloading it first if missing (or if ``force``).

    Google Drive files are fetched with ``gdown`` (which follows Drive's confirmation pages);
    a $KAPAO_WEIGHTS_URL mirror with plain HTTP (checked against its Content-Length). Either way the
    bytes go to a temporary file in the cache folder (with a progress bar), are checked (they load as
    weights) and are then moved into place atomically; a failed or truncated download leaves
    nothing behind. Offline, the error names the page to fetch by hand and the full path to save it as.
    """
    entry = REGISTRY[_check_name(name)]
    dest = weights_path(entry.name)
    if dest.is_file() and not force:
        return dest
    mirror = weights_url(entry.name) if os.environ.get(URL_ENV) else None
    by_hand = f"download {mirror or entry.page_url} by hand and save it as {dest}"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WeightsError(f"cannot create the weights folder {dest.parent} ({e.strerror}); set {DIR_ENV} to a "
                           f"writable folder, or {by_hand}") from None
    source = mirror or entry.url
    try:
        with atomic_write(dest, suffix=".part", check=lambda tmp: _verify_download(tmp, entry.name, source,
                                                                                   by_hand)) as f:
            if mirror:
                _download_http(mirror, f, entry.name, by_hand)
            else:
                _download_drive(entry, f, by_hand)
    except OSError as e:
        raise WeightsError(f"could not write {dest} ({e.strerror or e}); free disk space or set {DIR_ENV}, "
                           f"or {by_hand}") from None
    return dest


def _verify_download(tmp: Path, name: str, url: str, by_hand: str) -> None:
    from kapao.weights.loader import load_weights  # the loader resolves names through this module

    try:
        load_weights(tmp)
    except WeightsError as e:
        raise WeightsError(f"the file downloaded for {name} from {url} is not usable weights ({e}); it was "
                           f"deleted — {by_hand}") from None


def _progress(name: str, total: int | None) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"{name}.pt", leave=True)


class _CountingWriter(io.RawIOBase):
    """A write-only file that passes bytes on to ``out`` and advances a progress bar."""

    def __init__(self, out: Any, bar: Any):
        super().__init__()
        self.out, self.bar, self.written = out, bar, 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        n = self.out.write(b)
        n = len(b) if n is None else n
        self.written += n
        self.bar.update(n)
        return n


def _download_drive(entry: WeightsEntry, out: Any, by_hand: str) -> None:
    """Fetch a Google Drive file into ``out`` with gdown (quiet; our own progress bar; no cookie file).

    gdown's own messages (it prints failures instead of raising in some versions) are captured
    and reported in the WeightsError.
    """
    try:
        import gdown
    except ImportError:
        raise WeightsError(f"downloading {entry.name} from Google Drive needs the 'gdown' package "
                           f"(pip install gdown), or {by_hand}") from None
    said = io.StringIO()
    with _progress(entry.name, entry.file_bytes) as bar:
        writer = _CountingWriter(out, bar)
        try:
            with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
                result = gdown.download(id=entry.gdrive_id, output=writer, quiet=True, use_cookies=False)
        except OSError as e:
            if e.errno in _DISK_FULL:
                raise
            result, reason = None, str(e)
        except Exception as e:  # gdown raises its own errors (access denied, quota, ...) and requests'
            result, reason = None, f"{type(e).__name__}: {e}"
        else:
            reason = said.getvalue()
    if result is None or writer.written == 0:
        reason = " ".join(reason.split())[:300] or "no data"
        raise WeightsError(f"could not download {entry.name} from Google Drive ({reason}; offline, or Drive's "
                           f"download quota exceeded?); {by_hand}")
    if entry.file_bytes is not None and writer.written != entry.file_bytes:
        raise WeightsError(f"download of {entry.name} is truncated ({writer.written} of {entry.file_bytes} bytes); "
                           f"the partial file was deleted — try again, or {by_hand}")


def _download_http(url: str, out: Any, name: str, by_hand: str) -> None:
    """Stream ``url`` (a mirror: a plain file, no confirmation pages) into the open file ``out``."""
    request = urllib.request.Request(url, headers={"User-Agent": "kapao-weights/1 (python urllib)"})
    try:
        resp = urllib.request.urlopen(request, timeout=_DOWNLOAD_TIMEOUT)
    except urllib.error.HTTPError as e:
        raise WeightsError(f"could not download {name} from {url} (HTTP {e.code} {e.reason}); {by_hand}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise WeightsError(f"could not download {name} from {url} ({reason}; offline?); {by_hand}") from None
    with resp:
        if resp.headers.get("Content-Type", "").startswith("text/html"):
            raise WeightsError(f"{url} answered with a web page instead of {name}.pt (download quota exceeded, "
                               f"a login page, or a changed link); {by_hand}")
        length = resp.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        got = 0
        try:
            with _progress(name, total) as bar:
                while chunk := resp.read(_CHUNK):
                    out.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as e:
            if isinstance(e, OSError) and e.errno in _DISK_FULL:
                raise
            raise WeightsError(f"download of {name} from {url} broke off after {got} bytes ({e}); the partial "
                               f"file was deleted — try again, or {by_hand}") from None
    if total is not None and got != total:
        raise WeightsError(f"download of {name} from {url} is truncated ({got} of {total} bytes); the "
                           f"partial file was deleted — try again, or {by_hand}")
