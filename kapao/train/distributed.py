"""Multi-process (DDP) training: this process's device and process group, and the model wrapped for it.

Every torchrun process runs the same training (``torchrun --nproc_per_node N -m kapao train …``, or
:func:`kapao.distributed.launch` for ``--device 0,1,…``); every rank validates its share of the val split,
rank 0 alone computes the metrics, logs, plots and saves. Ranks, object exchange and launching live in
:mod:`kapao.distributed` (shared with predict and val).
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

from kapao.distributed import DIST_TIMEOUT, DistEnv, local_device

LOGGER = logging.getLogger(__name__)


def init_device(device: str, env: DistEnv) -> torch.device:
    """The device of this process; joins the process group (nccl on CUDA, gloo on CPU) under torchrun."""
    dev = local_device(device, env)
    if not env.distributed:
        return dev
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=DIST_TIMEOUT)
    if env.main:
        LOGGER.info("DDP: %d processes, backend %s", env.world_size, backend)
    return dev


def broadcast_weights(model: nn.Module, env: DistEnv) -> None:
    """Rank 0's parameters and buffers copied into `model` on every rank (the same architecture)."""
    if not env.distributed:
        return
    with torch.no_grad():
        for t in model.state_dict().values():
            dist.broadcast(t, 0)


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
