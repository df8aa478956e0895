"""Official KAPAO checkpoints: a real pickled YOLOv5-style module tree with the official class names, read without
its classes; code payloads refused and never run (API and CLI)."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import types
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kapao.cfg.schema import ANCHORS, STRIDES
from kapao.errors import WeightsError
from kapao.models.network import KapaoHead, KapaoModel
from kapao.weights.checkpoint import load_checkpoint, save_checkpoint
from kapao.weights.loader import load_model
from kapao.weights.official import convert_official, load_official_checkpoint
from kapao.weights.unpickle import StandIn
from tests.weights.test_checkpoint import COCO, CROWDPOSE, _outputs

_OFFICIAL = {"models.yolo": ("Model", "Detect"),
             "models.common": ("Focus", "Conv", "C3", "Bottleneck", "SPP", "Concat")}


@pytest.fixture
def official_classes():
    """Classes named models.yolo.Model, models.common.Conv, … registered while the file is written."""
    pkg = types.ModuleType("models")
    classes = {}
    mods = {"models": pkg}
    for modname, names in _OFFICIAL.items():
        mod = types.ModuleType(modname)
        for name in names:
            cls = type(name, (nn.Module,), {"__module__": modname, "__qualname__": name})
            setattr(mod, name, cls)
            classes[name] = cls
        mods[modname] = mod
    saved = {k: sys.modules.get(k) for k in mods}
    sys.modules.update(mods)
    yield classes
    for k, v in saved.items():  # the loader must not need them: they are gone before loading
        if v is None:
            sys.modules.pop(k, None)
        else:
            sys.modules[k] = v


def _as_official(module: nn.Module, classes: dict) -> nn.Module:
    """Copy of `module` whose ultralytics blocks are instances of the official-named classes."""
    name = type(module).__name__
    if type(module).__module__.startswith("ultralytics"):
        cls = classes[name]
    else:
        cls = type(module)
    new = cls.__new__(cls)
    new.__dict__ = dict(module.__dict__)
    new.__dict__["_modules"] = {k: _as_official(c, classes) for k, c in module._modules.items()}
    return new


def _official_checkpoint(model: KapaoModel, classes: dict, **top) -> dict:
    """What the official train.py + strip_optimizer save: {'model': Model (FP16), 'epoch': -1, ...}."""
    src = copy.deepcopy(model)
    k = src.num_keypoints
    stride = torch.tensor(STRIDES, dtype=torch.float32)
    head: KapaoHead = src.head
    detect = classes["Detect"]()
    detect.nc, detect.no, detect.nl, detect.na = 1 + k, 6 + 3 * k, 4, 3
    detect.grid = [torch.zeros(1)] * 4
    detect.register_buffer("anchors", head.anchors.clone())  # grid units
    detect.register_buffer("anchor_grid", (head.anchors * stride.view(-1, 1, 1)).view(4, 1, 3, 1, 1, 2))
    detect.m = head.m
    detect.stride, detect.inplace, detect.num_coords = stride, True, 2 * k
    detect.i, detect.f, detect.type, detect.np = 33, [23, 26, 29, 32], "models.yolo.Detect", 0
    layers = [_as_official(m, classes) for m in list(src.model)[:-1]] + [detect]
    for i, m in enumerate(layers):
        m.i, m.f = i, -1
    official = classes["Model"]()
    official.model = nn.Sequential(*layers)
    gd, gw = {"n": (0.33, 0.25), "s": (0.33, 0.5), "m": (0.67, 0.75), "l": (1.0, 1.0)}[src.size]
    official.yaml = {"nc": 1 + 3 * k, "depth_multiple": gd, "width_multiple": gw, "ch": 3,
                     "anchors": [[19, 27, 44, 40, 38, 94]] * 4, "backbone": [[-1, 1, "Focus", [64, 3]]],
                     "head": [[[23, 26, 29, 32], 1, "Detect", ["nc", "anchors"]]]}
    official.names = ["person", *src.schema.names]
    official.stride, official.save, official.nc = stride, [4, 6, 8], 1 + k
    official.hyp = {"lr0": 0.01, "kp": 0.025}
    official.class_weights = torch.ones(1 + k)
    official.half()
    for p in official.parameters():
        p.requires_grad = False
    ckpt = {"epoch": -1, "best_fitness": np.array([0.625]), "model": official, "optimizer": None,
            "training_results": None, "wandb_id": None, "ema": None, "updates": None}
    ckpt.update(top)
    return ckpt


@pytest.mark.slow
def test_official_checkpoint_loads_without_its_classes(tmp_path, official_classes, image):
    torch.manual_seed(3)
    src = KapaoModel("s", COCO).eval()
    custom_px = torch.tensor(ANCHORS, dtype=torch.float32) * 1.25
    with torch.no_grad():  # anchors the loader can only know from the checkpoint
        src.head.anchors.copy_(custom_px / torch.tensor(STRIDES, dtype=torch.float32).view(-1, 1, 1))
    path = tmp_path / "kapao_s_coco_official.pt"
    torch.save(_official_checkpoint(src, official_classes), path)
    for name in ("models", "models.yolo", "models.common"):
        del sys.modules[name]

    with pytest.raises(WeightsError, match="not a kapao checkpoint: it holds pickled Python objects"):
        load_checkpoint(path)
    raw = load_official_checkpoint(path)
    m = raw["model"]
    assert isinstance(m, StandIn) and m.qualname == "models.yolo.Model"
    assert m.get("yaml")["depth_multiple"] == 0.33 and m.get("names")[1] == "nose"
    detect = list(m.children["model"].children.values())[-1]
    assert detect.qualname == "models.yolo.Detect" and detect.get("nc") == 18 and detect.get("no") == 57

    model, info = load_model(path)
    assert "models.yolo" not in sys.modules and "models.common" not in sys.modules  # nothing imported
    assert info["format"] == "official" and info["size"] == "s" and info["num_keypoints"] == 17
    assert model.schema == COCO  # names in the checkpoint match the built-in COCO schema
    assert info["best_fitness"] == pytest.approx(0.625) and info["epoch"] == -1
    assert torch.allclose(torch.tensor(info["anchors"]), custom_px, rtol=1e-3)
    assert torch.allclose(model.anchors, custom_px, rtol=1e-3)
    assert all(v.dtype in (torch.float32, torch.int64) for v in model.state_dict().values())

    reference = copy.deepcopy(src).half().float()  # the same FP16-rounded weights
    got, want = _outputs(model, image), _outputs(reference, image)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-3)
    # and the original float32 model within fp16 tolerance
    assert torch.allclose(got, _outputs(src, image), rtol=2e-2, atol=0.5)

    converted = convert_official(path, tmp_path / "converted.pt")  # once, to plain data
    assert torch.load(converted, weights_only=True)["config"]["size"] == "s"
    again, info2 = load_model(converted)
    assert info2["format"] == "kapao" and info2["extra"]["best_fitness"] == pytest.approx(0.625)
    assert torch.equal(_outputs(again, image), got)


def test_official_checkpoint_with_ema_prefers_ema(tmp_path, official_classes, image):
    torch.manual_seed(4)
    a, b = KapaoModel("n", CROWDPOSE).eval(), KapaoModel("n", CROWDPOSE).eval()
    ckpt = _official_checkpoint(a, official_classes, epoch=7)
    ckpt["ema"] = _official_checkpoint(b, official_classes)["model"]
    path = tmp_path / "last.pt"
    torch.save(ckpt, path)
    model, info = load_model(path)
    assert info["epoch"] == 7 and model.schema == CROWDPOSE
    assert torch.allclose(_outputs(model, image), _outputs(copy.deepcopy(b).half().float(), image),
                          rtol=1e-4, atol=1e-3)


class _Payload:
    def __init__(self, reduce):
        self.reduce = reduce

    def __reduce__(self):
        return self.reduce


def _payloads(marker: Path) -> dict:
    return {
        "os.system": (os.system, (f"touch {marker}",)),
        "builtins.exec": (exec, (f"open({str(marker)!r}, 'w').close()",)),
        "builtins.eval": (eval, (f"open({str(marker)!r}, 'w').close()",)),
        "subprocess.Popen": (subprocess.Popen, (["touch", str(marker)],)),
    }


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "builtins.eval", "subprocess.Popen"])
@pytest.mark.parametrize("where", ["top", "inside_model"])
def test_code_payload_is_refused_and_never_runs(tmp_path, official_classes, kind, where):
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    payload = _Payload(_payloads(marker)[kind])
    model = KapaoModel("n", COCO)
    ckpt = _official_checkpoint(model, official_classes)
    if where == "top":
        ckpt["training_results"] = payload
    else:
        ckpt["model"].hyp = {"lr0": payload}
    path = tmp_path / "evil.pt"
    torch.save(ckpt, path)
    with pytest.raises(WeightsError, match=r"refused: the file tries to run code \((\w+)\.(\w+)\)") as e:
        load_model(path)
    assert kind.split(".")[1] in str(e.value) and str(path) in str(e.value)
    with pytest.raises(WeightsError):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("command", ["predict", "info", "val", "train", "export"])
def test_cli_refuses_code_payload_and_runs_nothing(tmp_path, official_classes, coco_mini_yaml, command):
    from click.testing import CliRunner

    from kapao.cli.main import cli

    marker = tmp_path / "pwned"
    ckpt = _official_checkpoint(KapaoModel("n", COCO), official_classes)
    ckpt["training_results"] = _Payload((os.system, (f"touch {marker}",)))
    evil = tmp_path / "evil.pt"
    torch.save(ckpt, evil)
    img = tmp_path / "a.jpg"
    img.write_bytes(b"")  # never read: the weights fail first
    data = ["--data", str(coco_mini_yaml), "--imgsz", "128", "--workers", "0"]
    argv = {"predict": ["predict", str(img)], "info": ["info"], "val": ["val", *data],
            "train": ["train", *data, "--project", str(tmp_path / "runs")], "export": ["export"]}[command]
    res = CliRunner().invoke(cli, [*argv, "--weights", str(evil)])
    assert res.exit_code == 1 and "Traceback" not in res.output and res.output.count("Error:") == 1
    assert res.output.strip().splitlines()[-1].startswith(f"Error: {evil}: refused: the file tries to run code "
                                                         "(posix.system)")
    assert not marker.exists()


def test_cli_corrupt_and_official_weights(tmp_path, official_classes, model_n):
    from click.testing import CliRunner

    from kapao.cli.main import cli

    good = save_checkpoint(tmp_path / "good.pt", model_n)
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good.read_bytes()[:100_000])
    res = CliRunner().invoke(cli, ["info", "--weights", str(trunc)])
    assert res.exit_code == 1 and res.output.count("\n") == 1
    assert res.output.startswith(f"Error: {trunc} is truncated or corrupt (") and \
        res.output.rstrip().endswith("): the copy or download was cut off or damaged; copy or download it again")
    official = tmp_path / "kapao_n_official.pt"
    torch.save(_official_checkpoint(model_n, official_classes), official)
    res = CliRunner().invoke(cli, ["info", "--weights", str(official), "--imgsz", "128"])
    assert res.exit_code == 0, res.output
    assert f"weights: {official} (official checkpoint)" in res.output and "keypoints (17): nose" in res.output
