"""Ranks and launching (kapao.distributed): the rank from torchrun's environment, single-process fallbacks,
errors shared between ranks and the launcher's command line (multi-process runs: tests/infer/test_shard.py,
tests/eval/test_val.py, tests/train/test_trainer.py)."""
from __future__ import annotations

import sys

import pytest

import kapao.distributed as kd
from kapao.errors import ConfigError, DataError


def test_launch_command(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert kd.should_launch("0,1") and kd.should_launch("cuda:0,1")
    assert not kd.should_launch("0") and not kd.should_launch("cpu") and not kd.should_launch("")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert not kd.should_launch("0,1")  # already a torchrun process
    seen = {}
    monkeypatch.setattr(kd.subprocess, "call", lambda cmd, env: seen.update(cmd=cmd, env=env) or 0)
    assert kd.launch("train", ["--data", "coco", "--device", "2,3"], "2,3") == 0
    assert seen["cmd"][:2] == [sys.executable, "-m"] and "torch.distributed.run" in seen["cmd"]
    i = seen["cmd"].index("--nproc_per_node")
    assert seen["cmd"][i + 1] == "2" and seen["cmd"][-6:] == ["kapao", "train", "--data", "coco", "--device", "2,3"]
    assert seen["env"]["CUDA_VISIBLE_DEVICES"] == "2,3"
    kd.launch("predict", [], "cpu", nproc=3)
    assert seen["cmd"][seen["cmd"].index("--nproc_per_node") + 1] == "3" and seen["cmd"][-1] == "predict"
    with pytest.raises(ConfigError):
        kd.launch("val", [], "a,b")
    assert kd.verb_argv("predict", ["kapao", "--verbose", "predict", "a", "--device", "0,1"]) == ["a", "--device", "0,1"]


@pytest.mark.parametrize("environ, expected", [
    ({}, kd.DistEnv(0, 0, 1, 1)),
    ({"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}, kd.DistEnv(0, 0, 1, 1)),  # torchrun with 1 process
    ({"LOCAL_RANK": "1", "RANK": "3", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}, kd.DistEnv(3, 1, 4, 2)),
])
def test_dist_env_from_environ(monkeypatch, environ, expected):
    for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
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
    assert kd.gather(obj, env) == [obj]
    kd.join(env)  # nothing to join
    kd.agree(None, env)
    with pytest.raises(DataError, match="disk"):
        kd.agree(DataError("disk full"), env)  # one process: its own error as it is
    kd.check_stop(env)
    kd.close(env)  # nothing to leave
