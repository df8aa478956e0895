"""Named weights fetched into the cache folder: Google Drive through gdown, or a $KAPAO_WEIGHTS_URL mirror over
plain HTTP; every download lands atomically and is checked before it is moved into place."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import io
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from kapao.errors import WeightsError
from kapao.runtime import atomic_write
from kapao.weights.detector import DETECTOR_FORMAT
from kapao.weights.reader import read_weights_file
from kapao.weights.registry import (
    DETECTORS,
    DIR_ENV,
    REGISTRY,
    URL_ENV,
    DetectorEntry,
    PathLike,
    WeightsEntry,
    check_name,
    check_weights_spec,
    weights_path,
)

_DOWNLOAD_TIMEOUT = 60.0  # seconds without data before a download is given up
_CHUNK = 1 << 20
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def resolve_weights(spec: PathLike) -> tuple[Path, str | None]:
    """(file, name or None) of a weights spec: an existing file, or a known name (downloaded if needed)."""
    path, name = check_weights_spec(spec)
    return (download_weights(name), name) if name else (path, None)



def weights_url(name: str) -> str:
    """The download URL of named weights ($KAPAO_WEIGHTS_URL with {id}/{name}, else Google Drive; a
    detector: $KAPAO_WEIGHTS_URL when it has {name}, else its YOLOv5 release asset)."""
    name = check_name(name)
    template = os.environ.get(URL_ENV)
    if name in DETECTORS:
        return template.replace("{name}", name) if template and "{name}" in template else DETECTORS[name].url
    entry = REGISTRY[name]
    return template.replace("{id}", entry.gdrive_id).replace("{name}", entry.name) if template else entry.url


def download_weights(name: str, *, force: bool = False) -> Path:
    """Return the cached file of named weights, downloading it first if missing (or if ``force``).

    Google Drive files are fetched with ``gdown`` (which follows Drive's confirmation pages);
    a $KAPAO_WEIGHTS_URL mirror with plain HTTP (checked against its Content-Length). Either way the
    bytes go to a temporary file in the cache folder (with a progress bar), are checked (they load as
    weights) and are then moved into place atomically; a failed or truncated download leaves
    nothing behind. Offline, the error names the page to fetch by hand and the full path to save it as.
    """
    name = check_name(name)
    if name in DETECTORS:
        return _download_detector(DETECTORS[name], force)
    entry = REGISTRY[name]
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


def _download_detector(entry: DetectorEntry, force: bool) -> Path:
    """The cached YOLOv5 release detector, fetched over HTTP first if missing: atomically, checked
    (sha256 when known; it must read as a YOLOv5 detector of the entry's size)."""
    dest = weights_path(entry.name)
    if dest.is_file() and not force:
        return dest
    url = weights_url(entry.name)
    by_hand = f"download {url} by hand and save it as {dest}"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(dest, suffix=".part", check=lambda tmp: _verify_detector(tmp, entry, url, by_hand)) as f:
            _download_http(url, f, entry.name, by_hand)
    except OSError as e:
        raise WeightsError(f"could not write {dest} ({e.strerror or e}); free disk space or set {DIR_ENV}, "
                           f"or {by_hand}") from None
    return dest


def _verify_detector(tmp: Path, entry: DetectorEntry, url: str, by_hand: str) -> None:
    if entry.sha256 is not None:
        digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
        if digest != entry.sha256:
            raise WeightsError(f"the file downloaded for {entry.name} from {url} has sha256 {digest}, not "
                               f"{entry.sha256}; it was deleted — {by_hand}")
    try:
        _, info = read_weights_file(tmp)
    except WeightsError as e:
        raise WeightsError(f"the file downloaded for {entry.name} from {url} is not usable weights ({e}); it was "
                           f"deleted — {by_hand}") from None
    if info["format"] != DETECTOR_FORMAT or info["size"] != entry.size:
        what = f"a YOLOv5-{info['size']} detector" if info["format"] == DETECTOR_FORMAT else f"{info['format']} weights"
        raise WeightsError(f"the file downloaded for {entry.name} from {url} is {what}, not the YOLOv5-{entry.size}6 "
                           f"detector; it was deleted — {by_hand}")


def _verify_download(tmp: Path, name: str, url: str, by_hand: str) -> None:
    try:
        read_weights_file(tmp)
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
                result = gdown.download(id=entry.gdrive_id, output=writer,  # type: ignore[arg-type]  # file-like: gdown only writes
                                        quiet=True, use_cookies=False)
        except OSError as e:
            if e.errno in _DISK_FULL:
                raise
            result, reason = None, str(e)
        except Exception as e:  # noqa: BLE001 - gdown raises its own errors (access denied, quota, ...) and requests'
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
