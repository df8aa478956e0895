"""The CLI side of many processes (kapao.cli.ranks): launching for a GPU list, a verb's body as one rank
(the multi-process runs themselves: tests/infer/test_shard.py, tests/eval/test_val.py)."""
from __future__ import annotations

import pytest

import kapao.cli.ranks as kr
from kapao.distributed import DistEnv, RankStopped


def test_launch_if_listed(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    calls = []
    monkeypatch.setattr(kr, "launch", lambda verb, argv, device: calls.append((verb, device)) or 3)
    kr.launch_if_listed("predict", "0")  # one device: runs here
    kr.launch_if_listed("predict", None)
    assert calls == []
    with pytest.raises(SystemExit) as e:
        kr.launch_if_listed("val", "0,1")
    assert e.value.code == 3 and calls == [("val", "0,1")]  # the launcher's exit code
    monkeypatch.setenv("LOCAL_RANK", "0")
    kr.launch_if_listed("val", "0,1")  # already a torchrun process
    assert len(calls) == 1


def test_as_rank_runs_the_body_and_stops_quietly():
    assert kr.as_rank(DistEnv(), "cpu", lambda dev: f"ran on {dev}") == "ran on cpu"

    def stopped(dev):
        raise RankStopped("stopped: rank 1 failed")

    with pytest.raises(SystemExit) as e:
        kr.as_rank(DistEnv(), "cpu", stopped)
    assert e.value.code == 1
