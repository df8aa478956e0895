"""Named weights fetched into the cache folder: Google Drive through gdown, or a $KAPAO_WEIGHTS_URL mirror over
plain HTTP; every download lands atomically and is checked before it is moved into place."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import io
import logging
import os
import sys
import time
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
DOWNLOAD_DEADLINE = 3600.0  # seconds a whole download may take
MIN_RATE = 20_000  # bytes/s a download must average once MIN_RATE_AFTER seconds have passed (a drip is given up)
MIN_RATE_AFTER = 30.0
_CHUNK = 1 << 20
LOGGER = logging.getLogger(__name__)
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def resolve_weights(spec: PathLike) -> tuple[Path, str | None]:
    """(file, name or None) of a weights spec: an existing file, or a known name (downloaded if needed)."""
    path, name = check_weights_spec(spec)
    return (download_weights(name), name) if name else (path, None)



def weights_url(name: str) -> str:
    """The download URL of named weights ($KAPAO_WEIGHTS_URL with {id}/{name}, else Google Drive; a
    detector: $KAPAO_WEIGHTS_URL when it has {name}, else its YOLOv5 release asset). WeightsError naming the
    variable when it is no http(s) URL with a host."""
    name = check_name(name)
    template = os.environ.get(URL_ENV)
    if template:
        _check_url_template(template)
    if name in DETECTORS:
        return template.replace("{name}", name) if template and "{name}" in template else DETECTORS[name].url
    entry = REGISTRY[name]
    return template.replace("{id}", entry.gdrive_id).replace("{name}", entry.name) if template else entry.url


def _check_url_template(template: str) -> None:
    import urllib.parse

    why = None
    try:
        parts = urllib.parse.urlsplit(template)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            why = "it is no http:// or https:// URL with a host"
        elif any(ord(c) < 33 for c in template):
            why = "it holds spaces or control characters"
        parts.port
    except ValueError as e:
        why = f"it cannot be parsed ({e})"
    if why:
        raise WeightsError(f"{URL_ENV}={template!r}: {why}; set it like https://mirror.example/{{name}}.pt, or unset it")


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
        with atomic_write(dest, suffix=".part", check=lambda tmp: _verify_download(tmp, entry, source,
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


def _verify_download(tmp: Path, entry: WeightsEntry, url: str, by_hand: str) -> None:
    """The downloaded bytes against the table's size and sha256 (where recorded), then as weights."""
    name, size = entry.name, tmp.stat().st_size
    h = hashlib.sha256()
    with open(tmp, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    digest = h.hexdigest()
    if entry.file_bytes is not None and size != entry.file_bytes:
        raise WeightsError(f"the file downloaded for {name} from {url} has {size} bytes, not the {entry.file_bytes} "
                           f"of the official file; it was deleted — {by_hand}")
    if entry.sha256 is not None and digest != entry.sha256:
        raise WeightsError(f"the file downloaded for {name} from {url} is not the official file (sha256 {digest[:16]}…, "
                           f"expected {entry.sha256[:16]}…); it was deleted — {by_hand}")
    try:
        read_weights_file(tmp)
    except WeightsError as e:
        raise WeightsError(f"the file downloaded for {name} from {url} is not usable weights ({e}); it was "
                           f"deleted — {by_hand}") from None
    if entry.sha256 is None:
        LOGGER.info("%s: no sha256 recorded to check the download against; it has %d bytes, sha256 %s", name, size,
                    digest)


def _progress(name: str, total: int | None, file: Any = None) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"{name}.pt", leave=True, file=file)


class _CountingWriter(io.RawIOBase):
    """A write-only file that passes bytes on to ``out`` and advances a progress bar, opened on the first
    bytes (a download that never starts shows no empty bar)."""

    def __init__(self, out: Any, name: str, total: int | None):
        super().__init__()
        self.out, self.name, self.total, self.written = out, name, total, 0
        self.bar: Any = None
        self.stream = sys.stderr  # the terminal's, even when the bar opens while gdown's output is captured

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        n = self.out.write(b)
        n = len(b) if n is None else n
        self.written += n
        if self.bar is None:
            self.bar = _progress(self.name, self.total, self.stream)
        self.bar.update(n)
        return n

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        super().close()


def _connection_failure(e: BaseException) -> bool:
    """True for "cannot reach the server" (offline, DNS, refused, timed out) as requests/urllib3 raise it."""
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"ConnectionError", "Timeout", "NewConnectionError", "MaxRetryError", "NameResolutionError",
                         "TimeoutError", "socket.gaierror", "gaierror"})


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
    writer = _CountingWriter(out, entry.name, entry.file_bytes)
    try:
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
            result = gdown.download(id=entry.gdrive_id, output=writer,  # type: ignore[arg-type]  # file-like: gdown only writes
                                    quiet=True, use_cookies=False)
    except Exception as e:
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            raise
        if _connection_failure(e):
            raise WeightsError(f"could not download {entry.name}: Google Drive cannot be reached (offline?); "
                               f"{by_hand}") from None
        result, reason = None, str(e) if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
    else:
        reason = said.getvalue()
    finally:
        writer.close()
    if result is None or writer.written == 0:
        reason = " ".join(reason.split())[:300] or "no data"
        raise WeightsError(f"could not download {entry.name} from Google Drive ({reason}; offline, or Drive's "
                           f"download quota exceeded?); {by_hand}")
    if entry.file_bytes is not None and writer.written != entry.file_bytes:
        raise WeightsError(f"download of {entry.name} is truncated ({writer.written} of {entry.file_bytes} bytes); "
                           f"the partial file was deleted — try again, or {by_hand}")


def _check_pace(got: int, seconds: float, name: str, url: str, by_hand: str) -> None:
    """WeightsError when a download passes DOWNLOAD_DEADLINE or averages below MIN_RATE (after MIN_RATE_AFTER)."""
    if seconds > DOWNLOAD_DEADLINE or (seconds > MIN_RATE_AFTER and got < MIN_RATE * seconds):
        why = (f"took longer than {DOWNLOAD_DEADLINE:.0f} s" if seconds > DOWNLOAD_DEADLINE else
               f"averages {got / seconds / 1000:.1f} kB/s, below the {MIN_RATE / 1000:.0f} kB/s minimum")
        raise WeightsError(f"download of {name} from {url} {why} ({got} bytes in {seconds:.0f} s); the partial file "
                           f"was deleted — try again, or {by_hand}")


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
        expected = REGISTRY[name].file_bytes if name in REGISTRY else None
        if total is not None and expected is not None and total != expected:
            raise WeightsError(f"{url} offers {total} bytes for {name}, not the {expected} of the official file; "
                               f"{by_hand}")
        got, t0 = 0, time.monotonic()
        try:
            with _progress(name, total) as bar:
                while chunk := resp.read1(_CHUNK):  # read1: returns what arrived, so a drip is noticed
                    out.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
                    _check_pace(got, time.monotonic() - t0, name, url, by_hand)
        except (OSError, http.client.HTTPException) as e:
            if isinstance(e, OSError) and e.errno in _DISK_FULL:
                raise
            raise WeightsError(f"download of {name} from {url} broke off after {got} bytes ({e}); the partial "
                               f"file was deleted — try again, or {by_hand}") from None
    if total is not None and got != total:
        raise WeightsError(f"download of {name} from {url} is truncated ({got} of {total} bytes); the "
                           f"partial file was deleted — try again, or {by_hand}")
