"""Weights: atomic kapao checkpoints, safe reading of official KAPAO checkpoints, cache and download.

Never touches the real network: downloads go to a local http.server on 127.0.0.1.
"""
from __future__ import annotations

import copy
import errno
import http.server
import os
import re
import socket
import subprocess
import sys
import threading
import types
import urllib.parse
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kapao.weights.checkpoint import CHECKPOINT_FORMAT, check_compatible, load_checkpoint, save_checkpoint, transfer_weights
from kapao.weights.loader import load_model
from kapao.weights.official import convert_official, load_official_checkpoint
from kapao.weights.registry import DIR_ENV, GDRIVE_IDS, URL_ENV, weights_dir, weights_path
from kapao.weights.download import download_weights, weights_url
from kapao.weights.unpickle import RestrictedUnpickler, StandIn
from kapao.cfg.schema import ANCHORS, STRIDES
from kapao.cfg.dataset import load_dataset_config
from kapao.errors import WeightsError
from kapao.models.network import KapaoHead, KapaoModel, generic_schema
from kapao.weights import registry

COCO = load_dataset_config("coco").schema
CROWDPOSE = load_dataset_config("crowdpose").schema


@pytest.fixture(scope="module")
def model_n() -> KapaoModel:
    torch.manual_seed(0)
    return KapaoModel("n", COCO).eval()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)[0]


# ----------------------------------------------------------------------------------------------
# kapao checkpoints


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


def test_plain_state_dict_loads(tmp_path, model_n, image):
    path = tmp_path / "sd.pt"
    torch.save(model_n.state_dict(), path)
    model, info = load_model(path)
    assert info["format"] == "state_dict" and info["size"] == "n" and info["num_keypoints"] == 17
    assert torch.equal(_outputs(model, image), _outputs(model_n, image))


def test_wrong_keypoint_count_is_a_clear_error(tmp_path, model_n):
    with pytest.raises(WeightsError, match=r"predict 17 keypoints \(nose.*but the data has 14 \(left_shoulder"):
        check_compatible(COCO, CROWDPOSE)
    check_compatible(COCO, COCO)
    path = save_checkpoint(tmp_path / "coco.pt", model_n)
    with pytest.raises(WeightsError, match="17 keypoints.*14") as e:
        load_model(path, schema=CROWDPOSE)
    assert str(path) in str(e.value)


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


# ----------------------------------------------------------------------------------------------
# Official checkpoints: a real pickled YOLOv5-style module tree with the official class names

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


class _Harmless:
    pass


def test_restricted_unpickler_refuses_unknown_classes():
    import io
    import pickle

    data = pickle.dumps({"x": _Harmless()}, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="_Harmless"):
        RestrictedUnpickler(io.BytesIO(data)).load()
    ok = pickle.dumps({"s": {1, 2}, "b": b"\x00\xff", "o": __import__("collections").OrderedDict(a=1)}, protocol=2)
    assert RestrictedUnpickler(io.BytesIO(ok)).load() == {"s": {1, 2}, "b": b"\x00\xff", "o": {"a": 1}}


# ----------------------------------------------------------------------------------------------
# Cache folder and downloads


def test_weights_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv(DIR_ENV, str(tmp_path / "mine"))
    assert weights_dir() == tmp_path / "mine"
    assert weights_path("kapao_m_crowdpose.pt") == tmp_path / "mine" / "kapao_m_crowdpose.pt"
    monkeypatch.delenv(DIR_ENV)
    pkg = tmp_path / "checkout" / "kapao"
    pkg.mkdir(parents=True)
    monkeypatch.setattr(registry, "_PACKAGE_DIR", pkg)
    if sys.platform.startswith("linux"):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert weights_dir() == tmp_path / "xdg" / "kapao"  # installed package: user cache
    (tmp_path / "checkout" / "weights").mkdir()
    assert weights_dir() == tmp_path / "checkout" / "weights"  # source checkout: repo weights/
    with pytest.raises(WeightsError, match="unknown weights name 'kapao_q_coco'"):
        weights_path("kapao_q_coco")


class _Server:
    """A local HTTP server; `routes` maps a path to a function(handler, query) that answers."""

    def __init__(self, routes: dict):
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.requests.append(self.path)
                parts = urllib.parse.urlsplit(self.path)
                route = routes.get(parts.path)
                if route is None:
                    self.send_error(404)
                    return
                route(self, dict(urllib.parse.parse_qsl(parts.query)))

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _send(handler, body: bytes, ctype="application/octet-stream", length=None):
    handler.send_response(200)
    handler.send_header("Content-Type", ctype)
    handler.send_header("Content-Length", str(len(body) if length is None else length))
    handler.end_headers()
    handler.wfile.write(body)


@pytest.fixture(scope="module")
def served_bytes(tmp_path_factory, model_n) -> bytes:
    return save_checkpoint(tmp_path_factory.mktemp("srv") / "w.pt", model_n).read_bytes()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(DIR_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_download_once_then_cache_hit(cache, served_bytes, monkeypatch, model_n, image):
    routes = {"/file": lambda h, q: _send(h, served_bytes)}
    with _Server(routes) as srv:
        monkeypatch.setenv(URL_ENV, srv.url + "/file?id={id}&name={name}")
        model, info = load_model("kapao_s_coco")
        assert srv.requests == [f"/file?id={GDRIVE_IDS['kapao_s_coco']}&name=kapao_s_coco"]
        assert info["name"] == "kapao_s_coco" and info["path"] == str(cache / "kapao_s_coco.pt")
        assert (cache / "kapao_s_coco.pt").read_bytes() == served_bytes
        assert sorted(p.name for p in cache.iterdir()) == ["kapao_s_coco.pt"]
        assert torch.equal(_outputs(model, image), _outputs(model_n, image))
        load_model("kapao_s_coco.pt")
        assert len(srv.requests) == 1  # second time: from the cache, no request


def _fake_gdown(monkeypatch, answer):
    """Install a stand-in `gdown` module whose download(**kw) calls answer(kw) and records its calls."""
    calls = []

    def download(**kw):
        calls.append(kw)
        return answer(kw)

    monkeypatch.setitem(sys.modules, "gdown", types.SimpleNamespace(download=download))
    return calls


def test_drive_download_goes_through_gdown_quietly_with_our_progress_bar(cache, served_bytes, monkeypatch, capsys):
    def answer(kw):
        print("Downloading... From: To:")  # what gdown prints when not quiet: must not reach the user
        for i in range(0, len(served_bytes), 50_000):
            kw["output"].write(served_bytes[i:i + 50_000])
        return kw["output"]

    monkeypatch.delenv(URL_ENV, raising=False)
    calls = _fake_gdown(monkeypatch, answer)
    path = download_weights("kapao_m_crowdpose")
    assert path == cache / "kapao_m_crowdpose.pt" and path.read_bytes() == served_bytes
    assert sorted(p.name for p in cache.iterdir()) == ["kapao_m_crowdpose.pt"]
    assert len(calls) == 1 and calls[0]["id"] == GDRIVE_IDS["kapao_m_crowdpose"]
    assert calls[0]["quiet"] is True and calls[0]["use_cookies"] is False
    out, err = capsys.readouterr()
    assert "Downloading" not in out + err
    assert "kapao_m_crowdpose.pt" in err and "B/s" in err  # our tqdm bar
    download_weights("kapao_m_crowdpose")
    assert len(calls) == 1  # cached


def test_drive_download_failure_says_what_to_fetch_and_where(cache, monkeypatch, capsys):
    def refused(kw):
        kw["output"].write(b"partial")
        print("Access denied with the following error: Too many users have viewed or downloaded this file")
        return None  # what gdown does after printing an access error

    monkeypatch.delenv(URL_ENV, raising=False)
    _fake_gdown(monkeypatch, refused)
    with pytest.raises(WeightsError) as e:
        download_weights("kapao_l_crowdpose")
    msg = str(e.value)
    assert "Too many users have viewed" in msg
    assert "https://drive.google.com/file/d/146DW9ELzIBY2oDofPru446yLErxHrjJU/view" in msg
    assert f"save it as {cache / 'kapao_l_crowdpose.pt'}" in msg
    assert list(cache.iterdir()) == []
    assert "Access denied" not in capsys.readouterr().out

    def offline(kw):
        raise ConnectionError("Failed to establish a new connection")

    _fake_gdown(monkeypatch, offline)
    with pytest.raises(WeightsError, match="Failed to establish a new connection; offline.*by hand and save it as"):
        download_weights("kapao_l_crowdpose")
    assert list(cache.iterdir()) == []


def test_truncated_download_leaves_nothing(cache, served_bytes, monkeypatch):
    routes = {"/t": lambda h, q: _send(h, served_bytes[:100_000], length=len(served_bytes))}
    with _Server(routes) as srv:
        monkeypatch.setenv(URL_ENV, srv.url + "/t?id={id}")
        with pytest.raises(WeightsError, match=f"truncated \\(100000 of {len(served_bytes)} bytes\\)") as e:
            load_model("kapao_l_coco")
    assert str(cache / "kapao_l_coco.pt") in str(e.value)
    assert list(cache.iterdir()) == []


def test_download_that_is_not_weights_is_deleted(cache, monkeypatch):
    routes = {"/q": lambda h, q: _send(h, b"<html>Quota exceeded</html>", ctype="text/html"),
              "/junk": lambda h, q: _send(h, b"\x00" * 5000)}
    with _Server(routes) as srv:
        monkeypatch.setenv(URL_ENV, srv.url + "/q")
        with pytest.raises(WeightsError, match="web page instead of kapao_s_coco.pt"):
            download_weights("kapao_s_coco")
        monkeypatch.setenv(URL_ENV, srv.url + "/junk")
        with pytest.raises(WeightsError, match="not usable weights.*it was deleted"):
            download_weights("kapao_s_coco")
    assert list(cache.iterdir()) == []


def test_offline_error_says_what_to_fetch_and_where(cache, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/w/{{name}}.pt"
    monkeypatch.setenv(URL_ENV, url)
    with pytest.raises(WeightsError) as e:
        load_model("kapao_s_crowdpose")
    msg = str(e.value)
    assert f"http://127.0.0.1:{port}/w/kapao_s_crowdpose.pt" in msg
    assert f"save it as {cache / 'kapao_s_crowdpose.pt'}" in msg
    assert list(cache.iterdir()) == []
    monkeypatch.delenv(URL_ENV)  # the default: Google Drive, and the page to fetch it by hand
    assert weights_url("kapao_s_coco") == ("https://drive.usercontent.google.com/download?"
                                             "id=1hv0xwdbdf-Ym06Hpjy6wKyIklNmKmB99&export=download&confirm=t")


def test_names_use_their_dataset_schema(cache, model_n):
    cache.mkdir()
    torch.manual_seed(6)
    save_checkpoint(cache / "kapao_s_crowdpose.pt", KapaoModel("n", generic_schema(14)))  # kp0..kp13
    model, info = load_model("kapao_s_crowdpose")
    assert model.schema == CROWDPOSE and info["keypoint_names"][0] == "left_shoulder"
    save_checkpoint(cache / "kapao_m_crowdpose.pt", model_n)  # a 17-keypoint file under a 14-keypoint name
    with pytest.raises(WeightsError, match="17 keypoints.*14"):
        load_model("kapao_m_crowdpose")
    with pytest.raises(WeightsError, match="not found: no such file, and not a known name"):
        load_model("kapao_s_cocoo")
    with pytest.raises(WeightsError, match="not found"):
        load_model(cache / "sub" / "kapao_s_coco.pt")  # an explicit missing path never downloads


def _pin(monkeypatch, name: str, **fields) -> None:
    """Give the table's entry for `name` a recorded size/sha256 (the real ones are not known here)."""
    import dataclasses

    from kapao.weights import download

    entry = dataclasses.replace(registry.REGISTRY[name], **fields)
    monkeypatch.setitem(registry.REGISTRY, name, entry)
    monkeypatch.setattr(download, "REGISTRY", registry.REGISTRY)


def test_a_download_is_checked_against_the_recorded_size_and_sha256(cache, served_bytes, monkeypatch, caplog):
    """A different file served under an official name is deleted with one line; the right one is kept."""
    import hashlib
    import logging

    routes = {"/f": lambda h, q: _send(h, served_bytes)}
    right = hashlib.sha256(served_bytes).hexdigest()
    with _Server(routes) as srv:
        monkeypatch.setenv(URL_ENV, srv.url + "/f?n={name}")
        _pin(monkeypatch, "kapao_s_coco", sha256="0" * 64)
        with pytest.raises(WeightsError, match=r"is not the official file \(sha256 .*it was deleted") as e:
            download_weights("kapao_s_coco")
        assert len(str(e.value).splitlines()) == 1 and not cache.exists() or list(cache.iterdir()) == []
        _pin(monkeypatch, "kapao_s_coco", file_bytes=len(served_bytes) + 1, sha256=None)
        with pytest.raises(WeightsError, match=f"offers {len(served_bytes)} bytes for kapao_s_coco, not the"):
            download_weights("kapao_s_coco")
        _pin(monkeypatch, "kapao_s_coco", file_bytes=len(served_bytes), sha256=right)
        assert download_weights("kapao_s_coco").read_bytes() == served_bytes
        _pin(monkeypatch, "kapao_m_coco", sha256=None)
        with caplog.at_level(logging.INFO, logger="kapao"):
            download_weights("kapao_m_coco")
        assert f"no sha256 recorded to check the download against; it has {len(served_bytes)} bytes, sha256 {right}" \
            in caplog.text


def test_a_dripping_server_is_given_up(cache, served_bytes, monkeypatch):
    """One byte every 0.2 s never trips the socket timeout; the minimum rate does."""
    import time

    from kapao.weights import download

    def drip(h, q):
        h.send_response(200)
        h.send_header("Content-Length", str(len(served_bytes)))
        h.end_headers()
        for b in served_bytes[:40]:
            h.wfile.write(bytes([b]))
            h.wfile.flush()
            time.sleep(0.05)

    monkeypatch.setattr(download, "MIN_RATE_AFTER", 0.5)
    monkeypatch.setattr(download, "MIN_RATE", 1000)
    with _Server({"/d": drip}) as srv:
        monkeypatch.setenv(URL_ENV, srv.url + "/d?n={name}")
        t0 = time.monotonic()
        with pytest.raises(WeightsError, match=r"averages .* kB/s, below the 1 kB/s minimum.*partial file was deleted"):
            download_weights("kapao_l_coco")
        assert time.monotonic() - t0 < 5
    assert list(cache.iterdir()) == []


@pytest.mark.parametrize("url, phrase", [
    ("not a url", "no http:// or https:// URL with a host"),
    ("ftp://mirror/{name}.pt", "no http:// or https:// URL with a host"),
    ("http://[::1/{name}", "cannot be parsed"),
    ("http://host:port/{name}", "cannot be parsed"),
    ("https://mirror.example/{name} .pt", "spaces or control characters"),
    ("file:///etc/{name}", "no http:// or https:// URL with a host"),
])
def test_a_malformed_mirror_url_is_named(cache, monkeypatch, url, phrase):
    monkeypatch.setenv(URL_ENV, url)
    with pytest.raises(WeightsError) as e:
        download_weights("kapao_s_coco")
    msg = str(e.value)
    assert msg.startswith(f"{URL_ENV}={url!r}: ") and phrase in msg and len(msg.splitlines()) == 1


def test_foreign_checkpoints_are_named_for_what_they_are(tmp_path):
    """An Ultralytics YOLO .pt and a TorchScript file are named (never loaded, nothing executed)."""
    import warnings

    import ultralytics.nn.tasks as tasks

    from kapao.weights.reader import read_weights_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(tmp_path / "ts.pt"))
    torch.save({"model": tasks.PoseModel, "epoch": 1}, tmp_path / "yolo11n-pose.pt")  # a pickled ultralytics class
    (tmp_path / "m.onnx").write_bytes(b"\x08\x08\x12\x07pytorch" + bytes(40))
    for name, phrase in (("ts.pt", "is a TorchScript model"), ("m.onnx", "is an ONNX model"),
                         ("yolo11n-pose.pt", "is an Ultralytics YOLO checkpoint (ultralytics.nn.tasks.PoseModel)")):
        with pytest.raises(WeightsError) as e:
            read_weights_file(tmp_path / name)
        assert phrase in str(e.value) and "bug" not in str(e.value) and len(str(e.value).splitlines()) == 1
