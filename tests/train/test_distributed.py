"""DDP helpers (kapao.train.distributed): the device outside torchrun, unwrapping and SyncBatchNorm on the CPU
(the 2-process gloo run itself is in test_trainer.py; ranks and launching in tests/test_distributed.py)."""
from __future__ import annotations

import logging

import torch
from torch import nn

import kapao.train.distributed as kd
from kapao.distributed import DistEnv


def test_single_process_needs_no_process_group():
    assert kd.init_device("cpu", DistEnv()) == torch.device("cpu")
    model = nn.Linear(2, 2)
    assert kd.unwrap(model) is model


def test_sync_batchnorm_is_ignored_on_cpu(caplog):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with caplog.at_level(logging.WARNING, logger="kapao"):
        assert kd.sync_batchnorm(model, torch.device("cpu")) is model
    assert "--sync-bn needs CUDA" in caplog.text and isinstance(model[1], nn.BatchNorm2d)
