"""Multi-process (DDP) training: this process's rank, its device and process group, sharing rank 0's
decisions, and launching one process per GPU.

Every torchrun process runs the same training (``torchrun --nproc_per_node N -m kapao train …``, or
:func:`launch_distributed` for ``--device 0,1,…``); rank 0 alone validates, logs, plots and saves.
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
from torch import nn

from kapao.errors import ConfigError
from kapao.runtime import select_device

LOGGER = logging.getLogger(__name__)

DIST_TIMEOUT = timedelta(minutes=60)  # rank 0 validates while the others wait


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a torchrun job (rank 0 of 1 outside torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_environ(cls) -> "DistEnv":
        """From torchrun's RANK/LOCAL_RANK/WORLD_SIZE; a single process without them (or with 1 process)."""
        if "LOCAL_RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
            return cls()
        return cls(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_device(device: str, env: DistEnv) -> torch.device:
    """The device of this process; joins the process group (nccl on CUDA, gloo on CPU) under torchrun."""
    if not env.distributed:
        return select_device(device)
    cpu = str(device).strip().lower() == "cpu" or not torch.cuda.is_available()
    if cpu:
        dev, backend = torch.device("cpu"), "gloo"
    else:  # torchrun/launch_distributed set CUDA_VISIBLE_DEVICES: process i uses visible GPU i
        if torch.cuda.device_count() <= env.local_rank:
            raise ConfigError(f"process {env.local_rank} of {env.world_size} has no GPU (only "
                              f"{torch.cuda.device_count()} visible); start fewer processes or use --device cpu")
        torch.cuda.set_device(env.local_rank)
        dev, backend = torch.device("cuda", env.local_rank), "nccl"
    dist.init_process_group(backend, timeout=DIST_TIMEOUT)
    if env.main:
        LOGGER.info("DDP: %d processes, backend %s", env.world_size, backend)
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


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.parallel.DistributedDataParallel:
    """`model` in DistributedDataParallel on this process's device (CPU: gloo, no device ids)."""
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` with SyncBatchNorm layers on CUDA; unchanged (with a warning) on the CPU."""
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        LOGGER.info("using SyncBatchNorm")
        return model
    LOGGER.warning("--sync-bn needs CUDA; ignored on CPU")
    return model


def should_launch(device: str | None) -> bool:
    """True when `device` lists several GPUs (0,1,...) and this process is not already one of torchrun's:
    the CLI then calls :func:`launch_distributed` instead of training in this process."""
    ids = [d for d in str(device or "").lower().replace("cuda:", "").split(",") if d.strip()]
    return len(ids) > 1 and "LOCAL_RANK" not in os.environ


def launch_distributed(argv: Sequence[str], devices: str | Sequence[int | str], nproc: int | None = None) -> int:
    """Re-run ``kapao train <argv>`` as ``python -m torch.distributed.run --nproc_per_node N -m kapao train``.

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
           "-m", "kapao", "train", *argv]
    LOGGER.info("launching %d processes: %s", n, " ".join(cmd))
    return subprocess.call(cmd, env=env)
