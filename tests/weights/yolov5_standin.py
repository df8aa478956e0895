"""Stand-in YOLOv5 P6 detector checkpoints, in the format of the release files (yolov5s6.pt …).

A release file is a ``torch.save``d dict whose ``model`` entry is a pickled ``models.yolo.Model``
(FP16) built from YOLOv5's own classes (``models.common.Focus``, ``Conv``, ``C3`` …). Those classes are
not installed here, so this module defines minimal ones of the same module/qualified names and
structure (written from the v5.0 and v6.0 ``yolov5*6.yaml`` layer tables), registers them under
``models.yolo`` / ``models.common`` in ``sys.modules`` only while pickling, and saves. Reading the file
back never imports them: kapao's restricted unpickler turns them into inert stand-ins.

Weights are random (seeded); only names, shapes, dtypes and the pickle format are those of the releases.
"""
from __future__ import annotations

import functools
import http.server
import math
import sys
import threading
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

import torch
from torch import nn

MULTIPLES = {"n": (0.33, 0.25), "s": (0.33, 0.50), "m": (0.67, 0.75), "l": (1.0, 1.0), "x": (1.33, 1.25)}
ANCHORS = [[19, 27, 44, 40, 38, 94], [96, 68, 86, 152, 180, 137], [140, 301, 303, 264, 238, 542],
           [436, 615, 739, 380, 925, 792]]
STRIDES = (8, 16, 32, 64)

# (kind, base channels or None, base repeats, extra) — v5.0 models/hub/yolov5*6.yaml backbone
BACKBONE_V5 = [("Focus", 64, 1, 3), ("Conv", 128, 1, (3, 2)), ("C3", 128, 3, True), ("Conv", 256, 1, (3, 2)),
               ("C3", 256, 9, True), ("Conv", 512, 1, (3, 2)), ("C3", 512, 9, True), ("Conv", 768, 1, (3, 2)),
               ("C3", 768, 3, True), ("Conv", 1024, 1, (3, 2)), ("SPP", 1024, 1, (3, 5, 7)), ("C3", 1024, 3, False)]
# v6.0+: a 6x6 Conv stem instead of Focus, 6 bottlenecks in layer 4, C3 then SPPF at the end
BACKBONE_V6 = [("Stem", 64, 1, (6, 2, 2)), ("Conv", 128, 1, (3, 2)), ("C3", 128, 3, True), ("Conv", 256, 1, (3, 2)),
               ("C3", 256, 6, True), ("Conv", 512, 1, (3, 2)), ("C3", 512, 9, True), ("Conv", 768, 1, (3, 2)),
               ("C3", 768, 3, True), ("Conv", 1024, 1, (3, 2)), ("C3", 1024, 3, True), ("SPPF", 1024, 1, 5)]
# the same head in v5.0 and v6.0 (layers 12-32), sources of concat layers given
HEAD = [("Conv", 768, 1, (1, 1)), ("Upsample",), ("Concat", (-1, 8)), ("C3", 768, 3, False),
        ("Conv", 512, 1, (1, 1)), ("Upsample",), ("Concat", (-1, 6)), ("C3", 512, 3, False),
        ("Conv", 256, 1, (1, 1)), ("Upsample",), ("Concat", (-1, 4)), ("C3", 256, 3, False),
        ("Conv", 256, 1, (3, 2)), ("Concat", (-1, 20)), ("C3", 512, 3, False),
        ("Conv", 512, 1, (3, 2)), ("Concat", (-1, 16)), ("C3", 768, 3, False),
        ("Conv", 768, 1, (3, 2)), ("Concat", (-1, 12)), ("C3", 1024, 3, False)]
DETECT_FROM = (23, 26, 29, 32)


def _named(cls: type, module: str) -> type:
    cls.__module__, cls.__qualname__ = module, cls.__name__
    return cls


class Conv(nn.Module):
    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2 if p is None else p, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU()


class Focus(nn.Module):
    def __init__(self, c1: int, c2: int, k: int = 1):
        super().__init__()
        self.conv = Conv(c1 * 4, c2, k)


class Bottleneck(nn.Module):
    def __init__(self, c1: int, c2: int, shortcut: bool = True):
        super().__init__()
        self.cv1, self.cv2 = Conv(c1, c2, 1), Conv(c2, c2, 3)
        self.add = shortcut and c1 == c2


class C3(nn.Module):
    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True):
        super().__init__()
        c_ = int(c2 * 0.5)
        self.cv1, self.cv2, self.cv3 = Conv(c1, c_, 1), Conv(c1, c_, 1), Conv(2 * c_, c2, 1)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut) for _ in range(n)))


class SPP(nn.Module):
    def __init__(self, c1: int, c2: int, k: tuple[int, ...] = (5, 9, 13)):
        super().__init__()
        c_ = c1 // 2
        self.cv1, self.cv2 = Conv(c1, c_, 1), Conv(c_ * (len(k) + 1), c2, 1)
        self.m = nn.ModuleList(nn.MaxPool2d(x, 1, x // 2) for x in k)


class SPPF(nn.Module):
    def __init__(self, c1: int, c2: int, k: int = 5):
        super().__init__()
        c_ = c1 // 2
        self.cv1, self.cv2 = Conv(c1, c_, 1), Conv(c_ * 4, c2, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)


class Concat(nn.Module):
    def __init__(self, dimension: int = 1):
        super().__init__()
        self.d = dimension


class Detect(nn.Module):
    def __init__(self, nc: int, ch: list[int], anchor_grid_buffer: bool):
        super().__init__()
        self.nc, self.no, self.nl, self.na = nc, nc + 5, len(ANCHORS), len(ANCHORS[0]) // 2
        self.grid = [torch.zeros(1)] * self.nl
        a = torch.tensor(ANCHORS, dtype=torch.float32).view(self.nl, -1, 2)
        self.stride = torch.tensor(STRIDES, dtype=torch.float32)
        self.register_buffer("anchors", a / self.stride.view(-1, 1, 1))  # grid units, as Model.__init__ leaves them
        if anchor_grid_buffer:  # v5.0: a buffer (pixels); v6.0+: a plain list attribute
            self.register_buffer("anchor_grid", a.clone().view(self.nl, 1, -1, 1, 1, 2))
        else:
            self.anchor_grid = [torch.zeros(1)] * self.nl
        self.m = nn.ModuleList(nn.Conv2d(x, self.no * self.na, 1) for x in ch)


class Model(nn.Module):
    def __init__(self, layers: list[nn.Module], yaml: dict, names: list[str]):
        super().__init__()
        self.yaml, self.names = yaml, names
        self.model = nn.Sequential(*layers)
        self.stride = torch.tensor(STRIDES, dtype=torch.float32)
        self.save = [4, 6, 8, 12, 16, 20, 23, 26, 29, 32]


for _cls in (Conv, Focus, Bottleneck, C3, SPP, SPPF, Concat):
    _named(_cls, "models.common")
_named(Detect, "models.yolo")
_named(Model, "models.yolo")


def _ch(c: int, gw: float) -> int:
    return math.ceil(c * gw / 8) * 8


def _n(n: int, gd: float) -> int:
    return max(round(n * gd), 1) if n > 1 else n


def build_detector(size: str = "s", version: str = "v5.0", nc: int = 80, seed: int = 0) -> Model:
    """A YOLOv5 P6 detector of ``size`` as ``version`` ('v5.0': Focus/SPP, 'v6.0': Conv stem/SPPF) built it."""
    gd, gw = MULTIPLES[size]
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    chans: list[int] = []
    c_prev = 3
    for spec in (BACKBONE_V5 if version == "v5.0" else BACKBONE_V6) + HEAD:
        kind = spec[0]
        if kind == "Upsample":
            layers.append(nn.Upsample(None, 2, "nearest"))
            chans.append(c_prev)
        elif kind == "Concat":
            src = [len(chans) - 1 if j == -1 else j for j in spec[1]]
            layers.append(Concat(1))
            chans.append(sum(chans[j] for j in src))
        else:
            c2, n, extra = _ch(spec[1], gw), _n(spec[2], gd), spec[3]
            layer = {"Focus": lambda: Focus(c_prev, c2, extra),
                     "Stem": lambda: Conv(c_prev, c2, extra[0], extra[1], extra[2]),
                     "Conv": lambda: Conv(c_prev, c2, *extra),
                     "C3": lambda: C3(c_prev, c2, n, extra),
                     "SPP": lambda: SPP(c_prev, c2, extra),
                     "SPPF": lambda: SPPF(c_prev, c2, extra)}[kind]()
            layers.append(layer)
            chans.append(c2)
        c_prev = chans[-1]
    layers.append(Detect(nc, [chans[i] for i in DETECT_FROM], anchor_grid_buffer=version == "v5.0"))
    yaml = {"nc": nc, "depth_multiple": gd, "width_multiple": gw, "anchors": ANCHORS}
    return Model(layers, yaml, [f"class{i}" for i in range(nc)])


@contextmanager
def _yolov5_modules() -> Iterator[None]:
    """``models``, ``models.common`` and ``models.yolo`` in sys.modules, so that pickle finds the classes."""
    pkg, common, yolo = (types.ModuleType(n) for n in ("models", "models.common", "models.yolo"))
    for cls in (Conv, Focus, Bottleneck, C3, SPP, SPPF, Concat):
        setattr(common, cls.__name__, cls)
    yolo.Model, yolo.Detect = Model, Detect
    pkg.common, pkg.yolo = common, yolo
    saved = {n: sys.modules.get(n) for n in ("models", "models.common", "models.yolo")}
    sys.modules.update({"models": pkg, "models.common": common, "models.yolo": yolo})
    try:
        yield
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def save_release_file(path: Path, size: str = "s", version: str = "v5.0", nc: int = 80, seed: int = 0,
                      plain_state_dict: bool = False, weights: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write a stand-in release checkpoint (or, with ``plain_state_dict``, the model's state dict) to ``path``.

    The release layout (``strip_optimizer``): ``{'epoch': -1, 'best_fitness': ..., 'training_results': None,
    'model': Model (FP16, no grad), 'optimizer': None, 'wandb_id': None}``. ``weights``: tensors to put
    in place of the random ones where name and shape match (e.g. a trained kapao state_dict).
    """
    model = build_detector(size, version, nc, seed)
    if weights is not None:
        own = model.state_dict()
        model.load_state_dict({k: v for k, v in weights.items() if k in own and v.shape == own[k].shape}, strict=False)
    model = model.half()
    for p in model.parameters():
        p.requires_grad_(False)
    if plain_state_dict:
        torch.save(model.state_dict(), path)
        return path
    ckpt = {"epoch": -1, "best_fitness": 0.5, "training_results": None, "model": model, "optimizer": None,
            "wandb_id": None, "ema": None, "updates": None}
    with _yolov5_modules():
        torch.save(ckpt, path)
    return path


class FileServer:
    """A local HTTP server on 127.0.0.1 serving the files of one folder; records request paths."""

    def __init__(self, folder: Path):
        seen = self.requests = []

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                seen.append(self.path)
                super().do_GET()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=folder))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
