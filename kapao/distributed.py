"""Several processes under torchrun: this process's rank, joining the process group, sharing objects and
errors between ranks, and launching one process per GPU (``--device 0,1,2,3``).

Used by every verb that runs on many processes: train (DDP, :mod:`kapao.train.distributed` adds the
model wrapping), and predict, track and val, whose ranks exchange only Python objects (work plans,
results, errors) through a gloo group, on GPUs too: nothing of their tensors crosses the wire.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist

from kapao.errors import ConfigError, KapaoError
from kapao.runtime import cpu_count, select_device

LOGGER = logging.getLogger(__name__)

DIST_TIMEOUT = timedelta(minutes=60)  # the longest one rank waits for the others at a collective step
ERROR_KEY = "kapao/error"  # key in the rendezvous store: the first error of any rank (stops the others)


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a torchrun job (rank 0 of 1 outside torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @classmethod
    def from_environ(cls) -> "DistEnv":
        """From torchrun's RANK/LOCAL_RANK/WORLD_SIZE/LOCAL_WORLD_SIZE; a single process without them (or
        with 1 process)."""
        if "LOCAL_RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
            return cls()
        return cls(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]),
                   int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


class RankStopped(KapaoError):
    """Raised on a rank because another rank failed; that rank's error is the one reported."""


def join(env: DistEnv, backend: str = "gloo") -> None:
    """Join the process group of a torchrun job (nothing outside torchrun)."""
    if env.distributed and not dist.is_initialized():
        dist.init_process_group(backend, timeout=DIST_TIMEOUT)


def local_device(device: str | None, env: DistEnv) -> torch.device:
    """The device of this process: under torchrun GPU `local_rank` of the visible ones (torchrun or
    :func:`launch` set CUDA_VISIBLE_DEVICES), or the CPU with cores/local-processes threads."""
    cpu = str(device or "").strip().lower() == "cpu" or not torch.cuda.is_available()
    if not env.distributed:
        return select_device(device)
    if cpu:
        torch.set_num_threads(cpu_count(physical=True))  # this process's share of the cores (no oversubscription)
        return torch.device("cpu")
    if torch.cuda.device_count() <= env.local_rank:
        raise ConfigError(f"process {env.local_rank} of {env.local_world_size} on this node has no GPU (only "
                          f"{torch.cuda.device_count()} visible); start fewer processes or use --device cpu")
    torch.cuda.set_device(env.local_rank)
    return torch.device("cuda", env.local_rank)


def start(device: str | None, env: DistEnv) -> torch.device:
    """Join the job's gloo group, then take this rank's device (:func:`local_device`); a rank without its
    GPU fails every rank, with the reason on rank 0."""
    join(env)
    dev, error = None, None
    try:
        dev = local_device(device, env)
    except ConfigError as e:
        error = e
    agree(error, env)
    assert dev is not None  # agree() raised otherwise
    return dev


def close(env: DistEnv) -> None:
    """Leave the process group (if this process joined one)."""
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def broadcast(obj: Any, env: DistEnv) -> Any:
    """Rank 0's value of `obj` (any picklable object) on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, 0)
    return box[0]


def gather(obj: Any, env: DistEnv) -> list[Any] | None:
    """Every rank's `obj`, in rank order, on rank 0 (None on the others)."""
    if not env.distributed:
        return [obj]
    out: list[Any] | None = [None] * env.world_size if env.main else None
    dist.gather_object(obj, out, dst=0)
    return out


def agree(error: BaseException | None, env: DistEnv) -> None:
    """A step every rank reaches: when any rank brings an error, every rank raises -- the first failing
    rank's own error on rank 0 (named by rank), :class:`RankStopped` on the others."""
    if not env.distributed:
        if error is not None:
            raise error
        return
    lines: list[Any] = [None] * env.world_size
    dist.all_gather_object(lines, None if error is None or isinstance(error, RankStopped) else _describe(error))
    failed = [(r, e) for r, e in enumerate(lines) if e is not None]
    if not failed and error is None:
        return
    if not failed:  # only stopped ranks: the failing one is gone (killed); say so
        failed = [(-1, (1, "a rank stopped without saying why (killed?)"))]
    rank, (code, line) = failed[0]
    if env.main:
        err = KapaoError(line if rank < 0 else f"rank {rank}: {line}")
        err.exit_code = code
        raise err
    raise RankStopped(f"stopped: rank {rank} failed")


def _describe(e: BaseException) -> tuple[int, str]:
    """(exit code, one line) of an error, as the CLI would print it."""
    if isinstance(e, KapaoError):
        return e.exit_code, str(e)
    first = (str(e).strip().splitlines() or [""])[0]
    return 1, f"unexpected {type(e).__name__}: {first[:300]} (rerun with --verbose for the traceback)"


def signal_error(env: DistEnv) -> None:
    """Tell the other ranks (through the rendezvous store) that this one failed, so that
    :func:`check_stop` stops them at their next frame instead of at the end of their work."""
    if env.distributed and dist.is_initialized():
        try:
            dist.distributed_c10d._get_default_store().set(ERROR_KEY, str(env.rank))
        except Exception:
            LOGGER.debug("could not signal the error to the other ranks", exc_info=True)


def check_stop(env: DistEnv) -> None:
    """Raise :class:`RankStopped` when another rank has signalled an error (a quick store look-up)."""
    if env.distributed and dist.is_initialized():
        if dist.distributed_c10d._get_default_store().check([ERROR_KEY]):
            raise RankStopped("stopped: another rank failed")


def device_ids(device: str | None) -> list[str]:
    """The GPU indices of a device list ('0,1,2' or 'cuda:0,1'): several means one process each."""
    return [d.strip() for d in str(device or "").lower().replace("cuda:", "").split(",") if d.strip()]


def should_launch(device: str | None) -> bool:
    """True when `device` lists several GPUs (0,1,...) and this process is not already one of torchrun's:
    the CLI then calls :func:`launch` instead of running in this process."""
    return len(device_ids(device)) > 1 and "LOCAL_RANK" not in os.environ


def launch(verb: str, argv: Sequence[str], devices: str | Sequence[int | str], nproc: int | None = None) -> int:
    """Re-run ``kapao <verb> <argv>`` as ``python -m torch.distributed.run --nproc_per_node N -m kapao <verb>``.

    devices: GPU ids ('0,1,2,3' or a list), which become CUDA_VISIBLE_DEVICES (N = their count), or
    'cpu' with `nproc` processes (gloo backend; how CI tests it). Returns the launcher's exit code.
    """
    env = dict(os.environ)
    if isinstance(devices, str) and devices.strip().lower() == "cpu":
        n = int(nproc or 2)
    else:
        ids = [str(d).strip() for d in (devices.split(",") if isinstance(devices, str) else devices) if str(d).strip()]
        if not ids or not all(i.isdigit() for i in ids):
            raise ConfigError(f"--device {devices!r}: expected GPU ids such as 0,1,2,3")
        n = int(nproc or len(ids))
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
           "-m", "kapao", verb, *argv]
    LOGGER.info("launching %d processes: %s", n, " ".join(cmd))
    return subprocess.call(cmd, env=env)


def verb_argv(verb: str, argv: Sequence[str] | None = None) -> list[str]:
    """The arguments after `verb` on this process's command line (what :func:`launch` passes on)."""
    argv = list(sys.argv if argv is None else argv)
    return argv[argv.index(verb) + 1:] if verb in argv else []
