"""Where a run executes and reports: device selection, incrementing `runs/<verb>/expN` folders, atomic
file writes, logging."""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Iterator, Mapping

from kapao.errors import ConfigError, KapaoError, MissingPackageError, OutsideRootError

if TYPE_CHECKING:
    import torch

# Optional packages -> the pyproject extra that installs them (the one line a missing one prints).
EXTRAS = {"openvino": "openvino", "onnxslim": "onnx",
          "pandas": "pandas", "mlflow": "mlflow", "wandb": "wandb"}


def optional_import(module: str, why: str, error: type[KapaoError] = MissingPackageError) -> Any:
    """Import an optional package, or raise `error` in one line naming what needs it and the extra that
    installs it (``pip install 'kapao[openvino]'``); a core dependency missing says to reinstall kapao."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        how = f"pip install 'kapao[{EXTRAS[top]}]'" if top in EXTRAS else \
            f"it is a kapao dependency: pip install {top} (or reinstall kapao)"
        raise error(f"{why} needs the '{top}' package, which is not installed; {how}") from None


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bfloat16 arithmetic


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (the first ``flags`` line of /proc/cpuinfo); empty where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def cpu_bf16(flags: "frozenset[str] | set[str] | None" = None) -> bool:
    """Whether the CPU computes in bfloat16 natively (AVX512_BF16 or AMX); `flags` default: :func:`cpu_flags`."""
    have = cpu_flags() if flags is None else flags
    return any(f in have for f in BF16_CPU_FLAGS)


def select_device(spec: str | int | torch.device | None = None) -> "torch.device":
    """Parse `cpu`, `0`, `cuda:1`, `mps`, a torch.device or None (first GPU if any, else CPU) into a device.

    A GPU list such as `0,1` selects its first entry; multi-GPU launching is train's business.
    """
    import torch  # deferred: the CLI imports this module before it needs torch

    text = "" if spec is None else str(spec).strip().lower()
    if text in ("", "auto"):
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError("--device mps: Apple MPS is not available on this machine; use --device cpu")
        return torch.device("mps")
    text = text.removeprefix("cuda:").removeprefix("cuda")
    ids = [t for t in text.split(",") if t != ""]
    if not ids or not all(t.isdigit() for t in ids):
        raise ConfigError(f"--device '{spec}': expected cpu, mps, a GPU index (0) or a list (0,1)")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    bad = [i for i in ids if int(i) >= n]
    if bad:
        have = f"GPUs 0..{n - 1}" if n else "no CUDA GPU"
        raise ConfigError(f"--device '{spec}': this machine has {have}; use --device cpu" + (f" or 0..{n - 1}" if n else ""))
    return torch.device(f"cuda:{ids[0]}")


def increment_run_dir(project: str | os.PathLike[str], name: str = "exp", exist_ok: bool = False) -> Path:
    """Create and return `project/name`, or `project/nameN` with the next free N (exp, exp2, exp3 …).

    Raises KapaoError naming the folder when it cannot be created (a file in the way, no permission,
    disk full).
    """
    try:
        return _increment_run_dir(Path(project), name, exist_ok)
    except OSError as e:
        raise KapaoError(f"cannot create a run folder under {project}: {os_error_reason(e, Path(project) / name)}; "
                         "use --project with a writable folder") from None


def remove_if_empty(path: Path | None) -> None:
    """Remove the run folder `path` when it exists and holds nothing: a run that failed before writing
    anything leaves no empty expN behind (call it from the failure path, then re-raise); its own lock file
    (:class:`RunLock`) does not count."""
    if path is not None and path.is_dir() and all(p.name == RunLock.NAME for p in path.iterdir()):
        shutil.rmtree(path, ignore_errors=True)  # empty but for the lock file of the run that failed


def os_error_reason(e: OSError, path: Path) -> str:
    """Why creating or writing `path` failed, in words; names a file that stands where a folder is needed."""
    blocker = next((p for p in Path(path).parents if p.exists() and not p.is_dir()), None)
    return f"{blocker} is a file, not a folder" if blocker else (e.strerror or str(e))


def _increment_run_dir(project: Path, name: str, exist_ok: bool) -> Path:
    path = project / name
    if exist_ok:
        path.mkdir(parents=True, exist_ok=True)
        return path
    project.mkdir(parents=True, exist_ok=True)
    taken = {p.name for p in project.iterdir()}
    if name in taken:
        pattern = re.compile(rf"^{re.escape(name)}(\d+)$")
        nums = [int(m.group(1)) for t in taken if (m := pattern.match(t))]
        path = project / f"{name}{max(nums, default=1) + 1}"
    path.mkdir(parents=True)
    return path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *, suffix: str = ".tmp", newline: str | None = None,
                 check: Callable[[Path], None] | None = None) -> Iterator[IO[Any]]:
    """Write `path` all or nothing: yields an open temporary file in its folder that replaces `path` at the end.

    Missing parent folders are created. The temporary file (`.<name>.XXXX<suffix>`) is flushed and
    fsync'ed, checked by `check` (given its path) when given, made readable like a plain new file (0o666
    less the umask, not mkstemp's 0o600) and moved over `path` with os.replace; the folder is then
    fsync'ed where possible. On any exception, KeyboardInterrupt included, the temporary file is removed
    and the exception re-raised: `path` keeps its previous content. Text modes use UTF-8. Callers turn
    OSError into their own one-line KapaoError.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{_short_name(path.name)}.", suffix=suffix, dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8", newline=newline) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def inside_root(root: str | os.PathLike, entry: str | os.PathLike, where: str = "") -> Path:
    """The path a data file's `entry` names under `root`, refused unless it stays inside `root`.

    The one rule for paths read from data files (COCO `file_name`, YOLO image lists, run folders): the
    entry is joined onto `root` (an absolute entry stands for itself), `..` and every symlinked folder on
    the way are resolved, and the result must lie strictly inside the resolved `root`. The last component
    is not resolved: a linked image (as `kapao convert` makes them) is the dataset's own file. Writers
    must still create that last component without following it (O_EXCL). Raises OutsideRootError
    (`where` first, e.g. "a.json: image id 3:") naming the entry and the rule; also for a NUL byte or an
    empty entry. Returns the joined path (not resolved), so messages show what the file says.
    """
    text = os.fspath(entry)
    text = os.fsdecode(text) if isinstance(text, bytes) else text
    shown = f"{where} " if where else ""
    if "\x00" in text or not text.strip():
        what = "holds a NUL byte, which no file name can" if "\x00" in text else "is empty"
        raise OutsideRootError(f"{shown}path {text!r} {what}; fix the entry")
    base = Path(os.path.abspath(os.fspath(root)))
    path = Path(os.path.normpath(base / text))
    real_base = Path(os.path.realpath(base))
    real = Path(os.path.realpath(path.parent)) / path.name
    if path.name in ("", "..") or not real.is_relative_to(real_base) or real == real_base:
        raise OutsideRootError(f"{shown}path {text!r} leads outside {base} (paths in data files must stay inside "
                               "their folder, symlinked folders included); fix the entry or move the file inside")
    return path


class RunLock:
    """An exclusive lock on a run folder, held while a process writes into it (predict, its --resume, train).

    `fcntl.flock` on `FOLDER/.kapao.lock`, which holds the owner's pid: the OS drops the lock when the
    owner dies, however it dies, so a stale file never blocks. A second writer is refused with a
    KapaoError naming the holder's pid. The file is removed on release. No-op where flock is missing.
    """

    NAME = ".kapao.lock"

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / self.NAME
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # Windows
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                raise KapaoError(f"{self.path.parent} is in use by another kapao process (pid {holder}); wait for "
                                 "it to finish, or stop it, or write to another run folder") from None
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:  # not a file a releasing owner just removed
                    break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)  # closing drops the lock
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class Terminated(KeyboardInterrupt):
    """SIGTERM (how Slurm, Kubernetes and systemd stop a job), raised like Ctrl-C so that every clean-up
    path of Ctrl-C runs for it too: finished frames kept, videos finalised, training saved, temp files removed."""

    signum = 15


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`Terminated` in the main thread (once: a second one during the
    clean-up is ignored); the previous handler is restored at the end. A no-op off the main thread."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_writable(path: str | os.PathLike) -> None:
    """Raise OSError now, not after slow work, when :func:`atomic_write` could not create `path` (parents made)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{_short_name(path.name)}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.unlink(name)


def _short_name(name: str, limit: int = 120) -> str:
    """`name` cut to `limit` bytes (at a character boundary) for a temporary file beside it: a file name of
    up to 255 bytes must still get its `.<name>.XXXXXXXX.tmp` without passing the file-name limit."""
    raw = os.fsencode(name)
    return name if len(raw) <= limit else os.fsdecode(raw[:limit])  # any bytes are a valid POSIX file name


def _umask() -> int:
    """The process umask, read from /proc where possible (os.umask can only read it by setting it)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status", encoding="ascii") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def plain_data(obj: Any, where: str = "value") -> Any:
    """A copy of ``obj`` holding only plain data: what JSON and ``torch.load(weights_only=True)`` read.

    Kept: None, bool, int, float, str (subclasses such as numpy scalars and enums become the exact
    type), tensors (detached, on the CPU), dicts with str/int keys, lists, tuples. Converted: numpy
    scalars -> Python numbers, numpy arrays -> tensors, paths -> str, ``nn.Module`` -> its state_dict.
    Anything else raises TypeError naming where it is (``where`` plus the keys/indices down to it).
    """
    if obj is None:
        return None
    for t in (bool, int, float, str):  # exact types: np.float64, enums etc. are subclasses
        if isinstance(obj, t):
            return t(obj)
    torch = sys.modules.get("torch")  # a tensor or module can only exist if torch is imported
    if torch is not None and isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if torch is not None and isinstance(obj, torch.nn.Module):  # e.g. the EMA model
        return {k: v.detach().cpu() for k, v in obj.state_dict().items()}
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if type(obj).__module__ == "numpy":
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray) and obj.dtype != object and torch is not None:
            return torch.from_numpy(obj.copy())
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where} has a key {k!r} of type {type(k).__name__}; keys must be str or int")
            out[k] = plain_data(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        items = [plain_data(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, not plain data")


# Environment read by libraries when they are imported: OpenCV's and FFmpeg's own log lines (which would
# print above kapao's one-line error) and ultralytics' settings banner are silenced; a user's own value wins.
QUIET_ENV = {"OPENCV_LOG_LEVEL": "ERROR", "OPENCV_FFMPEG_LOGLEVEL": "-8", "YOLO_VERBOSE": "False"}


def quiet_third_party() -> None:
    """Set :data:`QUIET_ENV` (where unset) before OpenCV or ultralytics is imported, and show Python
    warnings as one plain `kapao` log line instead of `file.py:304: UserWarning: …` plus a source line.
    Called by the command-line entry point only; the library leaves a host program's settings alone."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    warnings.showwarning = _warning_as_log_line


def _warning_as_log_line(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                         file: IO[str] | None = None, line: str | None = None) -> None:
    logging.getLogger("kapao").warning("warning: %s", message)


class _TqdmHandler(logging.StreamHandler):
    """Writes log lines through tqdm, so that they never cut through a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def setup_logging(verbose: bool = False, main_process: bool = True) -> None:
    """Send the `kapao` logger's INFO (DEBUG with verbose) messages to stderr (through tqdm, so they do not
    interleave with progress bars), unless logging is already configured; in multi-process training the
    other ranks only warn."""
    logger = logging.getLogger("kapao")
    if not main_process:
        logger.setLevel(logging.WARNING)
        return
    if not logger.handlers and not logging.getLogger().handlers:
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)


def cpu_count(physical: bool = False) -> int:
    """CPUs this process may run on: its affinity mask where the OS has one (a container's or ``taskset``'s
    limit), else the machine's CPU count; at least 1.

    ``physical=False`` counts logical CPUs (hyper-threads included): the bound for worker processes and
    threads that mostly wait (data loading, :func:`kapao.data.dataset.build_dataloader`, the training sampler).
    ``physical=True`` caps that at the machine's physical cores (psutil; without it every allowed CPU
    counts): the thread count of the CPU runtimes (onnxruntime intra-op, OpenVINO), whose convolutions a
    second hyper-thread on the same core does not speed up. Under torchrun that count is shared by the
    processes of this machine (LOCAL_WORLD_SIZE): each gets cores / processes, so none oversubscribes.
    """
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = os.cpu_count() or 1
    allowed = max(1, allowed)
    if not physical:
        return allowed
    try:
        import psutil  # optional: without it, every allowed core counts

        cores = psutil.cpu_count(logical=False) or allowed
    except ImportError:
        cores = allowed
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1) if "LOCAL_RANK" in os.environ else 1
    return max(1, min(allowed, cores) // max(1, local))
