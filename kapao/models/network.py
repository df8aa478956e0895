"""The KAPAO network: a YOLOv5 (v5.0) P6 backbone/PAN neck with a keypoint-aware detection head.

One layer table (:data:`P6_LAYERS`) defines the network; the sizes n/s/m/l/x only scale its depth
and width (:data:`SIZES`). Modules come from ultralytics so that the state_dict keys are the official
KAPAO ones (``model.{i}.conv.bn.weight``, ``model.33.m.{0..3}.weight``, ``model.33.anchors``) and the
official checkpoints load 1:1.

Forward
    ``model.train()``: list of 4 raw tensors (B, 3, H/stride, W/stride, no), one per stride 8/16/32/64;
    ``model.eval()``: ``(decoded, raw)`` where ``decoded`` is (B, N, no) from :func:`decode` (boxes,
    keypoints in network-input pixels, scores as probabilities) and ``raw`` is the training output.
``no = HeadLayout(K).num_outputs = 5 + (1 + K) + 2K``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence, cast

import torch
from torch import Tensor, nn
from ultralytics.nn.modules import C3, SPP, Concat, Conv, Focus
from ultralytics.utils.torch_utils import fuse_conv_and_bn

from kapao.cfg.schema import (
    ANCHORS,
    MAX_STRIDE,
    STRIDES,
    HeadLayout,
    KeypointSchema,
    check_imgsz,
)
from kapao.errors import ConfigError

# ----------------------------------------------------------------------------------------------
# The network definition


@dataclass(frozen=True)
class LayerSpec:
    """One row of the layer table. Channels and repeats are the base (size-l) values."""

    kind: str  # focus | conv | c3 | spp | upsample | concat
    channels: int = 0  # base output channels (focus, conv, c3, spp)
    src: int | tuple[int, ...] = -1  # input layer index/indices; -1 = previous layer
    repeats: int = 1  # base bottleneck count (c3)
    k: int = 1  # kernel size (focus, conv)
    s: int = 1  # stride (conv)
    shortcut: bool = True  # residual bottlenecks (c3)
    pool: tuple[int, ...] = ()  # max-pool kernels (spp)


P6_LAYERS: tuple[LayerSpec, ...] = (
    # backbone
    LayerSpec("focus", 64, k=3),  # 0   P1/2
    LayerSpec("conv", 128, k=3, s=2),  # 1   P2/4
    LayerSpec("c3", 128, repeats=3),  # 2
    LayerSpec("conv", 256, k=3, s=2),  # 3   P3/8
    LayerSpec("c3", 256, repeats=9),  # 4
    LayerSpec("conv", 512, k=3, s=2),  # 5   P4/16
    LayerSpec("c3", 512, repeats=9),  # 6
    LayerSpec("conv", 768, k=3, s=2),  # 7   P5/32
    LayerSpec("c3", 768, repeats=3),  # 8
    LayerSpec("conv", 1024, k=3, s=2),  # 9   P6/64
    LayerSpec("spp", 1024, pool=(3, 5, 7)),  # 10
    LayerSpec("c3", 1024, repeats=3, shortcut=False),  # 11
    # PAN neck, top-down
    LayerSpec("conv", 768, k=1),  # 12
    LayerSpec("upsample"),  # 13
    LayerSpec("concat", src=(-1, 8)),  # 14  + backbone P5
    LayerSpec("c3", 768, repeats=3, shortcut=False),  # 15
    LayerSpec("conv", 512, k=1),  # 16
    LayerSpec("upsample"),  # 17
    LayerSpec("concat", src=(-1, 6)),  # 18  + backbone P4
    LayerSpec("c3", 512, repeats=3, shortcut=False),  # 19
    LayerSpec("conv", 256, k=1),  # 20
    LayerSpec("upsample"),  # 21
    LayerSpec("concat", src=(-1, 4)),  # 22  + backbone P3
    LayerSpec("c3", 256, repeats=3, shortcut=False),  # 23  -> P3/8 output
    # PAN neck, bottom-up
    LayerSpec("conv", 256, k=3, s=2),  # 24
    LayerSpec("concat", src=(-1, 20)),  # 25
    LayerSpec("c3", 512, repeats=3, shortcut=False),  # 26  -> P4/16 output
    LayerSpec("conv", 512, k=3, s=2),  # 27
    LayerSpec("concat", src=(-1, 16)),  # 28
    LayerSpec("c3", 768, repeats=3, shortcut=False),  # 29  -> P5/32 output
    LayerSpec("conv", 768, k=3, s=2),  # 30
    LayerSpec("concat", src=(-1, 12)),  # 31
    LayerSpec("c3", 1024, repeats=3, shortcut=False),  # 32  -> P6/64 output
)
HEAD_SOURCES: tuple[int, ...] = (23, 26, 29, 32)  # layers feeding the head (layer 33), strides 8/16/32/64


@dataclass(frozen=True)
class SizeSpec:
    depth: float  # bottleneck-count multiple
    width: float  # channel multiple

    def repeats(self, n: int) -> int:
        return max(round(n * self.depth), 1) if n > 1 else n

    def channels(self, c: int) -> int:
        return math.ceil(c * self.width / 8) * 8


SIZES: dict[str, SizeSpec] = {
    "n": SizeSpec(0.33, 0.25),
    "s": SizeSpec(0.33, 0.50),
    "m": SizeSpec(0.67, 0.75),
    "l": SizeSpec(1.00, 1.00),
    "x": SizeSpec(1.33, 1.25),
}


def _make_layer(spec: LayerSpec, c_in: int, size: SizeSpec) -> tuple[nn.Module, int]:
    """(module, output channels) of one table row; c_in = channels of its (first) input."""
    c_out = size.channels(spec.channels) if spec.channels else c_in
    if spec.kind == "focus":
        return Focus(c_in, c_out, spec.k), c_out
    if spec.kind == "conv":
        return Conv(c_in, c_out, spec.k, spec.s), c_out
    if spec.kind == "c3":
        return C3(c_in, c_out, size.repeats(spec.repeats), spec.shortcut), c_out
    if spec.kind == "spp":
        return SPP(c_in, c_out, spec.pool), c_out
    if spec.kind == "upsample":
        return nn.Upsample(scale_factor=2.0, mode="nearest"), c_in
    raise ValueError(f"unknown layer kind {spec.kind!r}")


# ----------------------------------------------------------------------------------------------
# Head and decoding


class KapaoHead(nn.Module):
    """Per-level 1x1 output convs. ``anchors`` is a buffer in grid units (pixels / stride), as in the
    official checkpoints; :attr:`KapaoModel.anchors` gives them in pixels."""

    anchors: Tensor  # the buffer registered in __init__

    def __init__(self, in_channels: Sequence[int], layout: HeadLayout,
                 anchors: Sequence[Sequence[Sequence[float]]] = ANCHORS, strides: Sequence[int] = STRIDES):
        super().__init__()
        anchors_px = torch.tensor(anchors, dtype=torch.float32)  # (nl, na, 2)
        if anchors_px.ndim != 3 or anchors_px.shape[-1] != 2 or len(strides) != anchors_px.shape[0] \
                or len(in_channels) != len(strides):
            raise ValueError(f"head: need one anchor set (na, 2) and one input per stride; got anchors "
                             f"{tuple(anchors_px.shape)}, strides {tuple(strides)}, inputs {len(in_channels)}")
        self.layout = layout
        self.strides = tuple(int(s) for s in strides)
        self.nl, self.na, self.no = anchors_px.shape[0], anchors_px.shape[1], layout.num_outputs
        stride_t = torch.tensor(self.strides, dtype=torch.float32).view(-1, 1, 1)
        self.register_buffer("anchors", anchors_px / stride_t)  # (nl, na, 2) grid units
        self.m = nn.ModuleList(nn.Conv2d(c, self.na * self.no, 1) for c in in_channels)

    def forward(self, xs: Sequence[Tensor]) -> list[Tensor]:
        """Feature maps (B, C_i, H_i, W_i) -> raw predictions (B, na, H_i, W_i, no) per level."""
        out = []
        for conv, x in zip(self.m, xs):
            b, _, h, w = x.shape
            out.append(conv(x).view(b, self.na, self.no, h, w).permute(0, 1, 3, 4, 2).contiguous())
        return out

    def initialize_biases(self) -> None:
        """Prior biases (YOLOv5): objectness for ~8 objects per 640x640 image, classes for p ~ 0.6/nc.

        Added to the default conv bias, as the official initialisation does; keypoint biases stay as is.
        """
        nc = self.layout.num_classes
        with torch.no_grad():
            for conv, s in zip(cast(Sequence[nn.Conv2d], self.m), self.strides):
                b = cast(Tensor, conv.bias).view(self.na, self.no)
                b[:, self.layout.obj] += math.log(8 / (640 / s) ** 2)
                b[:, self.layout.cls] += math.log(0.6 / (nc - 0.99))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        # Official checkpoints also store `anchor_grid` (the same anchors in pixels, another shape);
        # it is derived data, so it is dropped here to let them load strictly.
        state_dict.pop(prefix + "anchor_grid", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _grid(ny: int, nx: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(1, 1, ny, nx, 2) cell indices x, y."""
    gy, gx = torch.meshgrid(torch.arange(ny, device=device, dtype=dtype),
                            torch.arange(nx, device=device, dtype=dtype), indexing="ij")
    return torch.stack((gx, gy), -1).view(1, 1, ny, nx, 2)


def decode(raw: Sequence[Tensor], anchors: Tensor, strides: Sequence[int], layout: HeadLayout) -> Tensor:
    """Raw head outputs -> predictions in network-input pixels, all levels concatenated.

    raw:     per level (B, na, H, W, no) logits (not modified)
    anchors: (nl, na, 2) anchor w, h in pixels
    returns: (B, N, no), N = sum(na * H * W) ordered level, anchor, row, column. Channels follow
             ``layout``: box = cx, cy, w, h; obj and cls = probabilities; kpt = x1, y1, ..., xK, yK.

    xy = (2 sigma - 0.5 + cell) * stride;  wh = (2 sigma)^2 * anchor;
    keypoint = (4 sigma - 2) * anchor + cell * stride   (anchor w for x, h for y; no half-cell shift).
    """
    k = layout.num_keypoints
    out = []
    for p, anc, stride in zip(raw, anchors, strides):
        b, na, ny, nx, no = p.shape
        if no != layout.num_outputs:
            raise ValueError(f"decode: prediction has {no} channels, layout expects {layout.num_outputs}")
        y = p.sigmoid()
        grid = _grid(ny, nx, p.device, y.dtype)
        a = anc.to(y.dtype).view(1, na, 1, 1, 2)
        box = y[..., layout.box]
        xy = (box[..., :2] * 2 - 0.5 + grid) * stride
        wh = (box[..., 2:] * 2) ** 2 * a
        kp = y[..., layout.kpt].view(b, na, ny, nx, k, 2)
        kp = (kp * 4 - 2) * a.unsqueeze(-2) + (grid * stride).unsqueeze(-2)
        # one concatenation in HeadLayout order (box | obj | cls | kpt): no scatter ops in exported graphs
        d = torch.cat((xy, wh, y[..., layout.obj:layout.cls.stop], kp.flatten(-2)), -1)
        out.append(d.view(b, -1, no))
    return torch.cat(out, 1)


# ----------------------------------------------------------------------------------------------
# The model


# Kept for imports from before the schema builders moved to :class:`kapao.cfg.schema.KeypointSchema`.
generic_schema = KeypointSchema.generic
default_schema = KeypointSchema.for_count


class KapaoModel(nn.Module):
    """KAPAO network of one size for one keypoint schema (see the module docstring for forward outputs).

    Attributes: ``size`` ('n'..'x'), ``schema``, ``num_keypoints``, ``layout`` (HeadLayout),
    ``strides`` (8, 16, 32, 64), ``anchors`` (4, 3, 2) in pixels, ``config`` (plain data to rebuild
    with :meth:`from_config`).
    """

    def __init__(self, size: str = "s", schema: KeypointSchema | int = 17):
        super().__init__()
        if size not in SIZES:
            raise ConfigError(f"unknown model size '{size}'; choose one of {', '.join(SIZES)}")
        self.size = size
        self.schema = schema if isinstance(schema, KeypointSchema) else KeypointSchema.for_count(int(schema))
        self.layout = HeadLayout(self.schema.num_keypoints)
        self.strides = STRIDES
        scale = SIZES[size]

        layers: list[nn.Module] = []
        channels: list[int] = []
        self.sources: list[int | tuple[int, ...]] = []
        c_prev = 3
        module: nn.Module
        for i, spec in enumerate(P6_LAYERS):
            src = spec.src
            if spec.kind == "concat":
                idx = [i - 1 if j == -1 else j for j in cast(tuple[int, ...], src)]  # a concat has several inputs
                module, c_out = Concat(1), sum(channels[j] for j in idx)
            else:
                module, c_out = _make_layer(spec, c_prev, scale)
            layers.append(module)
            self.sources.append(src)
            channels.append(c_out)
            c_prev = c_out
        layers.append(KapaoHead([channels[i] for i in HEAD_SOURCES], self.layout, ANCHORS, STRIDES))
        self.sources.append(HEAD_SOURCES)
        self.model = nn.ModuleList(layers)  # keys model.{i}.…, as in the official checkpoints
        self._keep = {j for s in self.sources if not isinstance(s, int) for j in s if j != -1}
        self._initialize()

    # -- construction ------------------------------------------------------------------------
    def _initialize(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps, m.momentum = 1e-3, 0.03
            elif isinstance(m, Conv) and type(m.act) is nn.SiLU:
                m.act = nn.SiLU(inplace=True)  # own instance: ultralytics shares one default module
        self.head.initialize_biases()

    @property
    def config(self) -> dict[str, Any]:
        """Plain data (no tensors/objects) that rebuilds this architecture via :meth:`from_config`."""
        return {"size": self.size, "num_keypoints": self.num_keypoints, "schema": self.schema.to_dict()}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "KapaoModel":
        try:
            size = str(config["size"])
            schema = (KeypointSchema.from_dict(config["schema"], where="model config") if config.get("schema")
                      else int(config["num_keypoints"]))
        except KeyError as e:
            raise ConfigError(f"model config is missing {e}; it needs 'size' and 'schema' or 'num_keypoints'") from None
        model = cls(size, schema)
        if "num_keypoints" in config and int(config["num_keypoints"]) != model.num_keypoints:
            raise ConfigError(f"model config: num_keypoints {config['num_keypoints']} does not match its "
                              f"schema ({model.num_keypoints} keypoint names)")
        return model

    # -- attributes --------------------------------------------------------------------------
    @property
    def head(self) -> KapaoHead:
        return cast(KapaoHead, self.model[-1])

    @property
    def num_keypoints(self) -> int:
        return self.schema.num_keypoints

    @property
    def anchors(self) -> Tensor:
        """(nl, na, 2) anchor w, h in network-input pixels."""
        h = self.head
        return h.anchors * torch.tensor(self.strides, dtype=h.anchors.dtype, device=h.anchors.device).view(-1, 1, 1)

    # -- forward -----------------------------------------------------------------------------
    def forward_raw(self, x: Tensor) -> list[Tensor]:
        """Images (B, 3, H, W), H and W multiples of 64 -> raw head outputs (B, na, H/s, W/s, no) per level."""
        if x.ndim != 4 or x.shape[-2] % MAX_STRIDE or x.shape[-1] % MAX_STRIDE:
            raise ValueError(f"input must be (B, 3, H, W) with H and W multiples of {MAX_STRIDE}, got {tuple(x.shape)}")
        saved: dict[int, Any] = {}
        y: Any = x  # a tensor between layers; the list of a concat's inputs, and the head's list of levels
        for i, (module, src) in enumerate(zip(self.model, self.sources)):
            if not isinstance(src, int):
                y = [y if j == -1 else saved[j] for j in src]
            y = module(y)
            if i in self._keep:
                saved[i] = y
        return y

    def forward(self, x: Tensor) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Train mode: raw list; eval mode: (decoded (B, N, no) in input pixels, raw list)."""
        raw = self.forward_raw(x)
        if self.training:
            return raw
        return decode(raw, self.anchors, self.strides, self.layout), raw

    def fold_bn(self) -> "KapaoModel":
        """Fold every Conv's BatchNorm into its convolution, for inference (in place; returns self)."""
        for m in self.modules():
            if isinstance(m, Conv) and hasattr(m, "bn"):
                m.conv = fuse_conv_and_bn(m.conv, m.bn)
                delattr(m, "bn")
                m.forward = m.forward_fuse  # type: ignore[method-assign]  # the instance runs without its BN from now on
        return self


def build_model(size: str = "s", schema: KeypointSchema | int = 17) -> KapaoModel:
    """A freshly initialised KAPAO model; ``schema`` is a KeypointSchema or a keypoint count."""
    return KapaoModel(size, schema)


def kapao_n(schema: KeypointSchema | int = 17) -> KapaoModel:
    return KapaoModel("n", schema)


def kapao_s(schema: KeypointSchema | int = 17) -> KapaoModel:
    return KapaoModel("s", schema)


def kapao_m(schema: KeypointSchema | int = 17) -> KapaoModel:
    return KapaoModel("m", schema)


def kapao_l(schema: KeypointSchema | int = 17) -> KapaoModel:
    return KapaoModel("l", schema)


def kapao_x(schema: KeypointSchema | int = 17) -> KapaoModel:
    return KapaoModel("x", schema)


# ----------------------------------------------------------------------------------------------
# Summary


def count_flops(model: nn.Module, imgsz: int | tuple[int, int] = 640) -> float:
    """GFLOPs (2 x multiply-accumulates of all Conv2d layers) of one forward pass at imgsz.

    Measured with forward hooks at the smallest input (64x64) and scaled by the input area, which is
    exact for every input whose sides are multiples of 64 (all feature maps scale with it).
    """
    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
    check_imgsz(h)
    check_imgsz(w)
    macs = 0

    def hook(m: nn.Conv2d, inputs: Any, out: Tensor) -> None:
        nonlocal macs
        kh, kw = m.kernel_size
        macs += out.numel() * (m.in_channels // m.groups) * kh * kw

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    was_training = model.training
    p = next(model.parameters())
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, MAX_STRIDE, MAX_STRIDE, device=p.device, dtype=p.dtype))
    finally:
        for hd in handles:
            hd.remove()
        model.train(was_training)
    return 2 * macs * (h / MAX_STRIDE) * (w / MAX_STRIDE) / 1e9


def model_info(model: KapaoModel, imgsz: int = 640) -> dict[str, Any]:
    """Summary: name, size, layers (modules), parameters, gradients (trainable), GFLOPs at imgsz, keypoints."""
    params = list(model.parameters())
    return {
        "name": f"kapao-{model.size}",
        "size": model.size,
        "layers": sum(1 for _ in model.modules()),
        "parameters": sum(p.numel() for p in params),
        "gradients": sum(p.numel() for p in params if p.requires_grad),
        "imgsz": imgsz,
        "gflops": count_flops(model, imgsz),
        "num_keypoints": model.num_keypoints,
        "keypoint_names": list(model.schema.names),
    }


def format_model_info(info: Mapping[str, Any]) -> str:
    """The summary of :func:`model_info` as a few printable lines."""
    return (f"{info['name']}: {info['layers']} layers, {info['parameters']:,} parameters, "
            f"{info['gradients']:,} gradients, {info['gflops']:.1f} GFLOPs at {info['imgsz']}x{info['imgsz']}\n"
            f"keypoints ({info['num_keypoints']}): {', '.join(info['keypoint_names'])}")
