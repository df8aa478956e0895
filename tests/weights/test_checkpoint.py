"""kapao checkpoints: plain data, weights-only loading, atomic and fsynced saves, errors naming the file, weight transfer."""
from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kapao.cfg.dataset import load_dataset_config
from kapao.errors import WeightsError
from kapao.models.network import KapaoModel
from kapao.weights.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint, transfer_weights
from kapao.weights.loader import load_model

COCO = load_dataset_config("coco").schema
CROWDPOSE = load_dataset_config("crowdpose").schema



def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)[0]


def test_save_load_roundtrip_is_plain_data(tmp_path, model_n, image):
    path = tmp_path / "ckpt.pt"
    opt = torch.optim.SGD(model_n.parameters(), lr=0.01, momentum=0.9)
    extra = {"epoch": 3, "optimizer": opt.state_dict(), "metrics": {"ap": np.float64(0.5)}, "ema": model_n,
             "train_args": {"data": Path("/data/coco.yaml"), "imgsz": 640}, "dataset": "coco"}
    save_checkpoint(path, model_n, extra=extra)

    raw = torch.load(path, weights_only=True, map_location="cpu")  # plain data: no pickled classes
    assert raw["format"] == CHECKPOINT_FORMAT
    ckpt = load_checkpoint(path)
    assert ckpt["config"] == {"size": "n", "num_keypoints": 17, "schema": COCO.to_dict()}
    assert ckpt["extra"]["epoch"] == 3
    assert ckpt["extra"]["metrics"] == {"ap": 0.5} and type(ckpt["extra"]["metrics"]["ap"]) is float
    assert ckpt["extra"]["train_args"]["data"] == "/data/coco.yaml"
    assert ckpt["extra"]["kapao_version"] and ckpt["extra"]["date"].startswith("20")
    assert ckpt["extra"]["optimizer"]["param_groups"][0]["momentum"] == 0.9
    assert torch.equal(ckpt["extra"]["ema"]["model.33.m.0.weight"], model_n.head.m[0].weight)
    sd = model_n.state_dict()
    assert ckpt["state_dict"].keys() == sd.keys()
    assert all(torch.equal(ckpt["state_dict"][k], sd[k]) for k in sd)

    model, info = load_model(path)
    assert info["format"] == "kapao" and info["size"] == "n" and info["epoch"] == 3
    assert model.schema == COCO
    assert torch.equal(_outputs(model, image), _outputs(model_n, image))


def test_load_checkpoint_uses_weights_only(tmp_path, model_n, monkeypatch):
    path = save_checkpoint(tmp_path / "a.pt", model_n)
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real(*a, **k))
    load_checkpoint(path)
    assert calls == [{"map_location": "cpu", "weights_only": True}]


def test_save_rejects_objects_that_are_not_data(tmp_path, model_n):
    with pytest.raises(WeightsError, match=r"extra\['train_args'\]\['fn'\]"):
        save_checkpoint(tmp_path / "a.pt", model_n, extra={"train_args": {"fn": lambda: 0}})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("failure", ["enospc", "interrupt"])
def test_save_is_atomic(tmp_path, model_n, monkeypatch, failure):
    path = tmp_path / "last.pt"
    save_checkpoint(path, model_n, extra={"epoch": 1})
    before = path.read_bytes()
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)  # most of the file is written ...
        f.write(b"x" * 1000)
        if failure == "enospc":  # ... then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", failing_save)
    expected = (WeightsError, "No space left") if failure == "enospc" else (KeyboardInterrupt, None)
    with pytest.raises(expected[0], match=expected[1]) as e:
        save_checkpoint(path, model_n, extra={"epoch": 2})
    if failure == "enospc":
        assert str(path) in str(e.value)
    assert path.read_bytes() == before  # the previous checkpoint survives, byte for byte
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file left
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(path)["extra"]["epoch"] == 1


def test_save_fsyncs_before_replacing(tmp_path, model_n, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", Path(a).parent, Path(b)))
                        or real_replace(a, b))
    save_checkpoint(tmp_path / "b.pt", model_n)
    assert events[0] == "fsync"
    assert events[1] == ("replace", tmp_path, tmp_path / "b.pt")  # temp file in the same folder


def test_saved_checkpoint_is_readable_like_a_plain_file(tmp_path, model_n):
    umask = os.umask(0o022)
    os.umask(umask)
    path = save_checkpoint(tmp_path / "c.pt", model_n)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0o600


def test_load_errors_name_the_file(tmp_path, model_n):
    missing = tmp_path / "nope.pt"
    with pytest.raises(WeightsError, match=f"not found: {missing}"):
        load_checkpoint(missing)

    good = save_checkpoint(tmp_path / "good.pt", model_n)
    data = good.read_bytes()
    for name, content in [("trunc.pt", data[: len(data) // 2]), ("empty.pt", b""), ("page.pt", b"<html>quota</html>")]:
        bad = tmp_path / name
        bad.write_bytes(content)
        with pytest.raises(WeightsError, match="is truncated or corrupt") as e:
            load_checkpoint(bad)
        assert str(bad) in str(e.value) and "download it again" in str(e.value)
        with pytest.raises(WeightsError, match="is truncated or corrupt"):
            load_model(bad)
    # a good file of another kind is named as what it is, with no advice to download it again
    for name, content, kind in [("photo.pt", b"\xff\xd8\xff\xe0" + bytes(60), "is a JPEG image, not a checkpoint"),
                                ("model.onnx", b"\x08\x08\x12\x07pytorch" + bytes(40), "is an ONNX model, not a checkpoint"),
                                ("cfg.pt", b"path: ../coco\n", "is a text file (JSON/YAML/…), not a checkpoint")]:
        bad = tmp_path / name
        bad.write_bytes(content)
        for load in (load_checkpoint, load_model):
            with pytest.raises(WeightsError, match=re.escape(kind)) as e:
                load(bad)
            assert "download it again" not in str(e.value)

    other = tmp_path / "other.pt"
    torch.save({"epoch": 1, "weights": [1, 2]}, other)
    with pytest.raises(WeightsError, match=f"{other} is not a kapao checkpoint"):
        load_checkpoint(other)
    with pytest.raises(WeightsError, match="not a kapao checkpoint, an official KAPAO checkpoint or a state_dict"):
        load_model(other)


def test_transfer_weights_copies_matching_shapes(model_n):
    torch.manual_seed(5)
    target = KapaoModel("n", CROWDPOSE)
    head_before = target.head.m[0].weight.clone()
    n, total = transfer_weights(target, model_n.state_dict())
    assert total == len(target.state_dict())
    assert n == total - 8  # all but the 4 output convs' weight and bias (17 vs 14 keypoints)
    assert torch.equal(target.model[4].cv1.conv.weight, model_n.model[4].cv1.conv.weight)
    assert torch.equal(target.head.m[0].weight, head_before)
    n2, _ = transfer_weights(KapaoModel("n", CROWDPOSE), model_n.state_dict(), exclude=("anchors",))
    assert n2 == n - 1
