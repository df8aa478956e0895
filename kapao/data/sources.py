"""Input sources: image files (read for predict and for the dataset), folders, globs, videos, webcams, streams.

Every source yields :class:`Frame` items (BGR uint8 images plus where they came from), so predict
treats a folder of images and a video the same way.
"""
from __future__ import annotations

import contextlib
import glob
import os
import queue
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np
from PIL import Image, ImageOps

from kapao.cfg.schema import IMAGE_SUFFIXES, VIDEO_SUFFIXES
from kapao.errors import DataError

_EXIF_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
STREAM_PREFIXES = ("rtsp://", "rtmp://", "http://", "https://", "udp://", "tcp://")


@dataclass
class Frame:
    """One image to run on: `image` (H, W, 3) BGR uint8; `frame` is the index within a video, else None."""

    image: np.ndarray
    path: str  # file (image or video) or stream it came from
    frame: int | None = None
    fps: float | None = None  # frame rate of the video or stream (nominal for streams), None for images


@dataclass
class SourceSpec:
    """A resolved SOURCE argument: what kind it is and the concrete files or stream."""

    kind: str  # "images", "video", "mixed" (a folder with both) or "stream"
    items: list[str]  # image files, video files, or one stream/webcam address
    skipped: int = 0  # non-image/non-video files ignored in a folder or glob
    source: str = ""  # the SOURCE argument as given, for messages

    def __len__(self) -> int:
        return len(self.items)

    def is_video(self, item: str) -> bool:
        return self.kind == "stream" or Path(item).suffix.lower() in VIDEO_SUFFIXES


def default_source() -> Path:
    """Sample images that ship inside the installed ultralytics package (bus.jpg, zidane.jpg)."""
    import ultralytics  # deferred: heavy, only for the default example images

    return Path(ultralytics.__file__).parent / "assets"


def _classify(files: list[Path], what: str) -> SourceSpec:
    images = [str(f) for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
    videos = [str(f) for f in files if f.suffix.lower() in VIDEO_SUFFIXES]
    skipped = len(files) - len(images) - len(videos)
    if not images and not videos:
        raise DataError(f"{what} holds no image or video files ({skipped} other files); "
                        f"supported: {', '.join(IMAGE_SUFFIXES + VIDEO_SUFFIXES)}")
    if images and videos:  # a folder with both: images first, then each video
        return SourceSpec("mixed", images + videos, skipped)
    return SourceSpec("images" if images else "video", images or videos, skipped)


def resolve_source(source: str | int | Path | None) -> SourceSpec:
    """Turn a SOURCE argument into a SourceSpec, with a clear error for anything unusable."""
    text = str(default_source() if source is None else source)
    spec = _resolve(text)
    spec.source = text
    return spec


def _resolve(text: str) -> SourceSpec:
    if "\x00" in text:
        raise DataError(f"source {text!r} holds a NUL byte, which no file name or address can; fix the name")
    if text.isdigit():
        return SourceSpec("stream", [text])
    if text.lower().startswith(STREAM_PREFIXES):
        return SourceSpec("stream", [text])
    path = Path(text).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
        if not files:
            raise DataError(f"folder {path} is empty; give an image, a video, a folder of images or a glob")
        return _classify(files, f"folder {path}")
    if path.is_file():
        return _classify([path], f"file {path}")
    if any(c in text for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"glob '{text}' matches no files")
        return _classify(files, f"glob '{text}'")
    raise DataError(f"source '{text}' does not exist; give an image, video, folder, glob, webcam index (0) or stream URL")


@contextlib.contextmanager
def _opencv_quiet() -> Iterator[None]:
    """Silence OpenCV's own log output (not FFmpeg's) for the duration."""
    log = getattr(getattr(cv2, "utils", None), "logging", None)
    if log is None:
        yield
        return
    old = log.getLogLevel()
    log.setLogLevel(log.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        log.setLogLevel(old)


def frame_count(cap: cv2.VideoCapture, address: str) -> int | None:
    """Frames an opened capture reports; None for webcams and streams, which have no end."""
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    return n if n > 0 and not address.isdigit() else None


def opencv_safe(path: str) -> bool:
    """Whether OpenCV may be given `path` as text: its C++ side crashes (SIGSEGV) on a str that is not valid
    UTF-8, which is how Python holds a file name with undecodable bytes (as surrogates)."""
    try:
        path.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


@contextlib.contextmanager
def opencv_address(address: str) -> Iterator[str]:
    """`address` as OpenCV can open it: a file whose name is not valid UTF-8 is reached through a temporary
    link with a plain name (removed at the end)."""
    if opencv_safe(address):
        yield address
        return
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="kapao-")
    try:
        link = os.path.join(folder, "video" + "".join(c for c in Path(address).suffix if opencv_safe(c)))
        os.symlink(os.path.abspath(address), link)
        yield link
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def count_frames(address: str) -> int | None:
    """Frame count of a video that is not open yet (for a progress bar's total)."""
    with opencv_address(address) as safe:
        cap = cv2.VideoCapture(safe)
        try:
            return frame_count(cap, address)
        finally:
            cap.release()


class VideoReader:
    """Frames of a video file or stream, decoded in a background thread so decoding overlaps inference."""

    def __init__(self, address: str, prefetch: int = 8) -> None:
        self.address = address
        cap_arg: str | int = int(address) if address.isdigit() else address
        with _opencv_quiet(), opencv_address(str(cap_arg)) as safe:  # a missing camera makes OpenCV print
            self.cap = cv2.VideoCapture(cap_arg if isinstance(cap_arg, int) else safe)  # lines of its own
        if not self.cap.isOpened():
            if address.isdigit():
                raise DataError(f"cannot open webcam {address}: no camera at that index (or it is in use); connect "
                                "one, or give an image, video, folder or stream URL")
            raise DataError(f"cannot open video/stream '{address}': it is missing, unreadable, not a video or "
                            "not connected; check the file (e.g. play it) or the address")
        self.fps = self.cap.get(cv2.CAP_PROP_FPS) or 30.0
        if not 0 < self.fps < 1000:
            self.fps = 30.0
        self.width = int(self.cap.get(cv2.CAP_PROP_FRAME_WIDTH))
        self.height = int(self.cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        self.frame_count = frame_count(self.cap, address)
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                ok, img = self.cap.read()
                if not ok:
                    break
                self._queue.put(img)
        finally:
            self._queue.put(None)

    def __iter__(self) -> Iterator[Frame]:
        i = 0
        while (img := self._queue.get()) is not None:
            yield Frame(img, self.address, i, self.fps)
            i += 1
        self.close()

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                self._thread.join(timeout=0.05)
        self.cap.release()


# ----------------------------------------------------------------------------------------------
# Image files


def load_image(path: str | os.PathLike, apply_exif: bool = True) -> np.ndarray:
    """Read an image as BGR uint8 (H, W, 3): EXIF orientation applied, gray/RGBA/16-bit converted.

    Raises DataError naming the file when it is missing or cannot be decoded.
    """
    try:
        buf = np.fromfile(str(path), np.uint8)  # fromfile + imdecode also handles non-ASCII paths
    except OSError as e:
        raise DataError(f"cannot read image {path}: {e.strerror or e}; check that the file exists") from None
    flags = cv2.IMREAD_COLOR if apply_exif else cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    try:
        img = cv2.imdecode(buf, flags) if buf.size else None
    except cv2.error:  # e.g. more pixels than OpenCV accepts
        img = None
    if img is None:
        img = _load_with_pil(path, apply_exif)
    if img is None:
        raise DataError(f"cannot decode image {path}: the file is corrupt or not an image; remove or replace it")
    return img


def _load_with_pil(path: str | os.PathLike, apply_exif: bool) -> np.ndarray | None:
    """Fallback for formats OpenCV cannot decode."""
    try:
        with _pil_open(path) as im:
            im = ImageOps.exif_transpose(im) if apply_exif else im
            return cv2.cvtColor(np.asarray(im.convert("RGB")), cv2.COLOR_RGB2BGR)
    except Exception:  # noqa: BLE001 - any decoder failure means "not readable"
        return None


def _pil_open(path: str | os.PathLike) -> Any:  # PIL.Image.Image (PIL imported lazily)
    """PIL's own Image.open. Importing ultralytics replaces it with a version that, on a file PIL cannot
    identify, tries to pip-install a HEIF plugin: a corrupt or foreign file must not install packages."""
    return getattr(sys.modules.get("ultralytics.utils.patches"), "_image_open", Image.open)(path)


def probe_image(path: Path) -> tuple[str, tuple[int, int], tuple[int, int]]:
    """Cheap check without decoding pixels: ('ok'|'missing'|'corrupt', raw (h, w), EXIF-applied (h, w)).

    Reads the header with PIL and, for JPEGs, checks for the end-of-image marker in the last 1 KiB.
    """
    try:
        with _pil_open(path) as im:
            w, h = im.size
            fmt = im.format
            # (PNG is left out: PIL decodes the whole file to find its EXIF chunk)
            orientation = im.getexif().get(0x0112, 1) if fmt in ("JPEG", "MPO", "TIFF", "WEBP") else 1
            if fmt == "PNG":  # a truncated PNG has a valid header; only the chunk CRCs tell (no decoding)
                try:
                    im.verify()
                except Exception:  # noqa: BLE001 - PIL raises OSError/SyntaxError for broken chunks
                    return "corrupt", (0, 0), (0, 0)
        if fmt in ("JPEG", "MPO"):
            with open(path, "rb") as f:
                f.seek(max(0, path.stat().st_size - 1024))
                if b"\xff\xd9" not in f.read():
                    return "corrupt", (0, 0), (0, 0)
    except FileNotFoundError:
        return "missing", (0, 0), (0, 0)
    except Exception:  # noqa: BLE001 - PIL cannot read it: let OpenCV decide
        try:
            shape = load_image(path).shape[:2]
        except DataError:
            return ("corrupt" if path.exists() else "missing"), (0, 0), (0, 0)
        return "ok", shape, shape
    if w < 2 or h < 2:
        return "corrupt", (0, 0), (0, 0)
    return "ok", (h, w), ((w, h) if orientation in _EXIF_TRANSPOSED else (h, w))


# ----------------------------------------------------------------------------------------------
# In-memory images (the Python API)

ACCEPTED_INPUTS = ("a path, folder, glob, video, stream URL or webcam index (str, Path, int); a numpy array H×W or "
                   "H×W×1/3/4 (uint8 or uint16, BGR); a PIL image; a torch tensor laid out as such an array; or a "
                   "list, tuple or iterable (e.g. a generator) of images and image paths")


def is_single_image(obj: Any) -> bool:
    """Whether `obj` is one in-memory image: a numpy array, a PIL image or a torch tensor."""
    torch = sys.modules.get("torch")
    return isinstance(obj, np.ndarray) or type(obj).__module__.startswith("PIL.") or (
        torch is not None and isinstance(obj, torch.Tensor))


def as_bgr_image(obj: Any, where: str = "source") -> np.ndarray:
    """One image of the Python API as BGR uint8 (H, W, 3): an image path (read), a PIL image (as RGB), or
    an array/tensor H×W, H×W×1 (grey), H×W×3 (BGR), H×W×4 (BGRA) of uint8 or uint16 (top byte kept).

    TypeError naming `where` and the accepted inputs for any other type or dtype; ValueError for an
    empty or wrongly shaped array; DataError for an unreadable image file.
    """
    if isinstance(obj, (str, os.PathLike)) and not isinstance(obj, bytes):
        if "\x00" in os.fspath(obj):
            raise DataError(f"{where} {os.fspath(obj)!r} holds a NUL byte, which no file name can; fix the name")
        return load_image(obj)
    if type(obj).__module__.startswith("PIL.") and hasattr(obj, "convert"):
        return np.ascontiguousarray(np.asarray(obj.convert("RGB"))[..., ::-1])
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().numpy()
    if not isinstance(obj, np.ndarray):
        raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}; accepted: {ACCEPTED_INPUTS}")
    if obj.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"{where} is an array of {obj.dtype}; images are uint8 or uint16 (convert with "
                        "(a * 255).clip(0, 255).astype(np.uint8) from 0-1 floats)")
    shape = obj.shape
    if not (obj.ndim == 2 or (obj.ndim == 3 and shape[2] in (1, 3, 4))) or min(shape[:2], default=0) < 1:
        raise ValueError(f"{where} has shape {shape}; images are H×W or H×W×1/3/4 with H, W >= 1")
    img = (obj >> 8).astype(np.uint8) if obj.dtype == np.uint16 else obj
    if img.ndim == 2 or img.shape[2] == 1:
        return cv2.cvtColor(np.ascontiguousarray(img.reshape(shape[:2])), cv2.COLOR_GRAY2BGR)
    if img.shape[2] == 4:
        return cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_BGRA2BGR)
    return np.ascontiguousarray(img)


def iter_api_images(source: Any) -> Iterator[np.ndarray]:
    """The images of an in-memory source, one at a time (a generator is never held whole): one image
    (:func:`is_single_image`), or a list, tuple or iterable of images and image paths. TypeError for
    None, bytes, files and anything else, naming the accepted inputs."""
    if source is None:
        raise TypeError(f"source is None; give {ACCEPTED_INPUTS} (the sample images are only the CLI's default)")
    if is_single_image(source):
        yield as_bgr_image(source)
        return
    if isinstance(source, (bytes, bytearray, memoryview, str, os.PathLike, dict)) or hasattr(source, "read") or \
            not hasattr(source, "__iter__"):
        raise TypeError(f"source is a {type(source).__module__}.{type(source).__qualname__}; accepted: {ACCEPTED_INPUTS}")
    for i, item in enumerate(source):
        if not (is_single_image(item) or isinstance(item, (str, os.PathLike))):
            raise TypeError(f"source[{i}] is a {type(item).__module__}.{type(item).__qualname__}; each item must be "
                            "an image (numpy array, PIL image, torch tensor) or an image path")
        yield as_bgr_image(item, f"source[{i}]")
