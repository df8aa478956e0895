"""DDP helpers (kapao.train.distributed): the rank from torchrun's environment, single-process fallbacks and
the launcher's command line (the 2-process gloo run itself is in test_train.py)."""
from __future__ import annotations

import logging
import sys

import pytest
import torch
from torch import nn

import kapao.train.distributed as kd
from kapao.errors import ConfigError


def test_launch_distributed_command(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert kd.should_launch("0,1") and kd.should_launch("cuda:0,1")
    assert not kd.should_launch("0") and not kd.should_launch("cpu") and not kd.should_launch("")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert not kd.should_launch("0,1")  # already a torchrun process
    seen = {}
    monkeypatch.setattr(kd.subprocess, "call", lambda cmd, env: seen.update(cmd=cmd, env=env) or 0)
    assert kd.launch_distributed(["--data", "coco", "--device", "2,3"], "2,3") == 0
    assert seen["cmd"][:2] == [sys.executable, "-m"] and "torch.distributed.run" in seen["cmd"]
    i = seen["cmd"].index("--nproc_per_node")
    assert seen["cmd"][i + 1] == "2" and seen["cmd"][-6:] == ["kapao", "train", "--data", "coco", "--device", "2,3"]
    assert seen["env"]["CUDA_VISIBLE_DEVICES"] == "2,3"
    kd.launch_distributed([], "cpu", nproc=3)
    assert seen["cmd"][seen["cmd"].index("--nproc_per_node") + 1] == "3"
    with pytest.raises(ConfigError):
        kd.launch_distributed([], "a,b")


@pytest.mark.parametrize("environ, expected", [
    ({}, kd.DistEnv(0, 0, 1)),
    ({"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}, kd.DistEnv(0, 0, 1)),  # torchrun with 1 process
    ({"LOCAL_RANK": "1", "RANK": "3", "WORLD_SIZE": "4"}, kd.DistEnv(3, 1, 4)),
])
def test_dist_env_from_environ(monkeypatch, environ, expected):
    for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in environ.items():
        monkeypatch.setenv(k, v)
    env = kd.DistEnv.from_environ()
    assert env == expected
    assert env.distributed == (expected.world_size > 1) and env.main == (expected.rank == 0)


def test_single_process_needs_no_process_group():
    env = kd.DistEnv()
    obj = {"run": "runs/train/exp"}
    assert kd.broadcast(obj, env) is obj  # rank 0's value is this process's own
    assert kd.init_device("cpu", env) == torch.device("cpu")
    kd.close(env)  # nothing to leave
    model = nn.Linear(2, 2)
    assert kd.unwrap(model) is model


def test_sync_batchnorm_is_ignored_on_cpu(caplog):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with caplog.at_level(logging.WARNING, logger="kapao"):
        assert kd.sync_batchnorm(model, torch.device("cpu")) is model
    assert "--sync-bn needs CUDA" in caplog.text and isinstance(model[1], nn.BatchNorm2d)
