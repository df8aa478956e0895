"""The KAPAO network: architecture vs the official models, output shapes, decoding, fusing, info CLI."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from click.testing import CliRunner
from torch import nn
from ultralytics.nn.modules import Conv

from kapao.cfg.schema import ANCHORS, STRIDES, HeadLayout, KeypointSchema
from kapao.cli.main import cli
from kapao.cli.options import MODEL_SIZES
from kapao.errors import ConfigError
from kapao.models.network import (
    SIZES,
    KapaoModel,
    build_model,
    count_flops,
    decode,
    default_schema,
    kapao_n,
    kapao_s,
    model_info,
)

NO = {14: 48, 17: 57, 21: 5 + 22 + 42}


@pytest.fixture(scope="module")
def model_n() -> KapaoModel:
    torch.manual_seed(0)
    return kapao_n(17)


# ---------------------------------------------------------------------------------------------
# architecture
@pytest.mark.parametrize("size,k,expected", [
    ("s", 17, 12_559_980), ("s", 14, 12_525_312), ("m", 17, 35_755_404), ("l", 17, 77_047_852),
])
def test_parameter_counts_equal_official(size: str, k: int, expected: int):
    model = build_model(size, k)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_state_dict_keys_follow_official_names(model_n: KapaoModel):
    sd = model_n.state_dict()
    for key in ("model.0.conv.conv.weight", "model.0.conv.bn.running_var", "model.2.m.0.cv1.conv.weight",
                "model.2.cv3.bn.bias", "model.10.cv2.conv.weight", "model.24.conv.weight",
                "model.33.anchors", *(f"model.33.m.{i}.{p}" for i in range(4) for p in ("weight", "bias"))):
        assert key in sd, key
    assert not any(k.startswith("model.34") for k in sd)
    # the 1x1 output convs predict 3 anchors x 57 values from the four PAN outputs (s: 64..512 ch at l=1.0 x 0.5)
    model_s = kapao_s(17)
    assert [tuple(m.weight.shape) for m in model_s.head.m] == [(171, c, 1, 1) for c in (128, 256, 384, 512)]
    assert tuple(model_s.model[0].conv.conv.weight.shape) == (32, 12, 3, 3)  # Focus: 4x3 channels, k=3


@pytest.mark.parametrize("size,backbone_repeats,neck_repeats", [
    ("n", (1, 3, 3, 1), 1), ("s", (1, 3, 3, 1), 1), ("m", (2, 6, 6, 2), 2), ("x", (4, 12, 12, 4), 4),
])
def test_depth_and_shortcuts(size: str, backbone_repeats: tuple[int, ...], neck_repeats: int):
    model = build_model(size, 17)
    assert tuple(len(model.model[i].m) for i in (2, 4, 6, 8)) == backbone_repeats
    for i in (2, 4, 6, 8):
        assert all(b.add for b in model.model[i].m)  # residual bottlenecks in the backbone only
    for i in (11, 15, 19, 23, 26, 29, 32):
        assert len(model.model[i].m) == neck_repeats and not any(b.add for b in model.model[i].m)
    assert [m.kernel_size for m in model.model[10].m] == [3, 5, 7]


def test_init_bn_act_and_biases(model_n: KapaoModel):
    bns = [m for m in model_n.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-3 and m.momentum == 0.03 for m in bns)
    convs = [m for m in model_n.modules() if isinstance(m, Conv)]
    assert all(isinstance(c.act, nn.SiLU) and c.act.inplace for c in convs)
    assert len({id(c.act) for c in convs}) == len(convs)  # not ultralytics' shared default instance
    lay, nc = model_n.layout, model_n.layout.num_classes
    for conv, s in zip(model_n.head.m, STRIDES):
        b = conv.bias.detach().view(3, lay.num_outputs)
        noise = 1 / math.sqrt(conv.in_channels)  # default conv bias init range
        assert torch.allclose(b[:, lay.obj], torch.full((3,), math.log(8 / (640 / s) ** 2)), atol=noise)
        assert torch.allclose(b[:, lay.cls], torch.full((3, nc), math.log(0.6 / (nc - 0.99))), atol=noise)
        assert b[:, lay.kpt].abs().max() <= noise


def test_anchors_pixels_and_grid_buffer(model_n: KapaoModel):
    assert model_n.anchors.shape == (4, 3, 2)
    assert torch.equal(model_n.anchors, torch.tensor(ANCHORS, dtype=torch.float32))
    # the buffer is in grid units, as in the official checkpoints
    assert torch.equal(model_n.head.anchors, torch.tensor(ANCHORS, dtype=torch.float32)
                       / torch.tensor(STRIDES, dtype=torch.float32).view(-1, 1, 1))
    assert model_n.strides == (8, 16, 32, 64)


def test_official_state_dict_with_anchor_grid_loads_strictly(model_n: KapaoModel):
    sd = copy.deepcopy(model_n.state_dict())
    sd["model.33.anchor_grid"] = model_n.anchors.view(4, 1, 3, 1, 1, 2).clone()
    other = kapao_n(17)
    other.load_state_dict(sd, strict=True)
    assert torch.equal(other.head.m[2].weight, model_n.head.m[2].weight)
    assert "model.33.anchor_grid" in sd  # the caller's dict is left as it was


def test_config_round_trip(model_n: KapaoModel):
    cfg = model_n.config
    assert json.loads(json.dumps(cfg)) == cfg  # plain data
    rebuilt = KapaoModel.from_config(cfg)
    rebuilt.load_state_dict(model_n.state_dict(), strict=True)
    assert rebuilt.size == "n" and rebuilt.schema == model_n.schema
    assert KapaoModel.from_config({"size": "n", "num_keypoints": 14}).schema.names[-1] == "neck"
    with pytest.raises(ConfigError, match="size"):
        KapaoModel.from_config({"num_keypoints": 17})
    with pytest.raises(ConfigError, match="unknown model size"):
        build_model("q", 17)


def test_default_schemas():
    assert default_schema(17).names[0] == "nose"
    assert default_schema(14).names[-2:] == ("head", "neck")
    s = default_schema(21)
    assert s.names == tuple(f"kp{i}" for i in range(21)) and s.flip_index == tuple(range(21))


# ---------------------------------------------------------------------------------------------
# forward
@pytest.mark.parametrize("size", list(SIZES))
def test_train_output_shapes_every_size(size: str):
    model = build_model(size, 17).train()
    with torch.no_grad():
        raw = model(torch.rand(2, 3, 64, 64))  # batch 2: BatchNorm needs > 1 value on the 1x1 P6 map
    assert [tuple(r.shape) for r in raw] == [(2, 3, 64 // s, 64 // s, 57) for s in STRIDES]


@pytest.mark.parametrize("k", [14, 17, 21])
def test_eval_output_shapes_keypoint_counts(k: int):
    model = kapao_n(k).eval()
    x = torch.rand(2, 3, 128, 192)
    with torch.no_grad():
        decoded, raw = model(x)
    no = HeadLayout(k).num_outputs
    assert no == NO[k]
    assert [tuple(r.shape) for r in raw] == [(2, 3, 128 // s, 192 // s, no) for s in STRIDES]
    n = sum(3 * (128 // s) * (192 // s) for s in STRIDES)
    assert decoded.shape == (2, n, no)
    assert torch.equal(decoded, decode(raw, model.anchors, model.strides, model.layout))


def test_input_size_must_be_multiple_of_64(model_n: KapaoModel):
    with pytest.raises(ValueError, match="multiples of 64"):
        model_n(torch.zeros(1, 3, 96, 64))


def test_fuse_keeps_outputs():
    torch.manual_seed(1)
    model = kapao_n(17)
    model.train()
    with torch.no_grad():  # give BN non-trivial running statistics
        for _ in range(3):
            model(torch.rand(2, 3, 128, 128))
    model.eval()
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        before, _ = model(x)
        model.fold_bn()
        after, _ = model(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert torch.allclose(before, after, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# decode on hand-built tensors
def _raw_levels(k: int, b: int = 1, hw: int = 128, fill: float = 0.0) -> list[torch.Tensor]:
    no = HeadLayout(k).num_outputs
    return [torch.full((b, 3, hw // s, hw // s, no), fill) for s in STRIDES]


def _flat_index(level: int, anchor: int, gy: int, gx: int, hw: int = 128) -> int:
    sizes = [(hw // s) for s in STRIDES]
    start = sum(3 * n * n for n in sizes[:level])
    n = sizes[level]
    return start + (anchor * n + gy) * n + gx


def test_decode_zero_logits():
    k = 2
    lay = HeadLayout(k)
    anchors = torch.tensor(ANCHORS, dtype=torch.float32)
    raw = _raw_levels(k)
    out = decode(raw, anchors, STRIDES, lay)
    assert out.shape == (1, 3 * (16 * 16 + 8 * 8 + 4 * 4 + 2 * 2), lay.num_outputs)
    # level 1 (stride 16), anchor 2 (180 x 137), row gy=3, column gx=5
    row = out[0, _flat_index(1, 2, 3, 5)]
    assert row[lay.box].tolist() == [(5 + 0.5) * 16, (3 + 0.5) * 16, 180, 137]  # cell centre, anchor size
    assert torch.allclose(row[lay.obj], torch.tensor(0.5)) and torch.allclose(row[lay.cls], torch.full((3,), 0.5))
    assert row[lay.kpt].tolist() == [5 * 16, 3 * 16] * k  # sigma = 0.5 -> the cell's top-left corner
    assert all(torch.count_nonzero(r) == 0 for r in raw)  # inputs untouched


def test_decode_hand_computed_values():
    k = 1
    lay = HeadLayout(k)
    anchors = torch.tensor(ANCHORS, dtype=torch.float32)
    raw = _raw_levels(k)
    t3 = math.log(3.0)  # sigma = 0.75
    p = raw[3][0, 1, 1, 0]  # stride 64, anchor 1 (739 x 380), gy=1, gx=0
    p[lay.box] = torch.tensor([t3, -t3, t3, -t3])  # sigma 0.75, 0.25, 0.75, 0.25
    p[lay.kpt] = torch.tensor([t3, -t3])
    p[lay.obj] = 2.0
    row = decode(raw, anchors, STRIDES, lay)[0, _flat_index(3, 1, 1, 0)]
    expected_box = [(1.5 - 0.5 + 0) * 64, (0.5 - 0.5 + 1) * 64, 1.5 ** 2 * 739, 0.5 ** 2 * 380]
    assert torch.allclose(row[lay.box], torch.tensor(expected_box))
    # keypoint: (4 sigma - 2) * anchor + cell * stride = (+1 * 739 + 0, -1 * 380 + 64)
    assert torch.allclose(row[lay.kpt], torch.tensor([739.0, -380.0 + 64]))
    assert torch.allclose(row[lay.obj], torch.sigmoid(torch.tensor(2.0)))


def test_decode_rejects_wrong_layout():
    with pytest.raises(ValueError, match="channels"):
        decode(_raw_levels(17), torch.tensor(ANCHORS, dtype=torch.float32), STRIDES, HeadLayout(14))


# ---------------------------------------------------------------------------------------------
# summary and CLI
def test_flops_official_s6_at_1280():
    assert count_flops(kapao_s(17), 1280) == pytest.approx(68.3, abs=0.05)


def test_flops_scaling_matches_direct_measurement(model_n: KapaoModel):
    macs = 0

    def hook(m, _inp, out):
        nonlocal macs
        macs += out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]

    handles = [m.register_forward_hook(hook) for m in model_n.modules() if isinstance(m, nn.Conv2d)]
    model_n.eval()
    with torch.no_grad():
        model_n(torch.zeros(1, 3, 192, 128))
    for h in handles:
        h.remove()
    assert count_flops(model_n, (192, 128)) == pytest.approx(2 * macs / 1e9, rel=1e-9)
    with pytest.raises(ConfigError, match="multiple of 64"):
        count_flops(model_n, 100)


def test_model_info(model_n: KapaoModel):
    info = model_info(model_n, 640)
    assert info["parameters"] == sum(p.numel() for p in model_n.parameters()) == info["gradients"]
    assert info["num_keypoints"] == 17 and info["keypoint_names"][0] == "nose"
    assert info["layers"] == len(list(model_n.modules())) and info["gflops"] > 0


def test_cli_info_sizes_and_schemas():
    runner = CliRunner()
    res = runner.invoke(cli, ["info", "--size", "s", "--imgsz", "1280"])
    assert res.exit_code == 0, res.output
    assert "12,559,980 parameters" in res.output and "68.3 GFLOPs" in res.output and "right_ankle" in res.output
    res = runner.invoke(cli, ["info", "--size", "s", "--kpts", "14", "--imgsz", "640"])
    assert res.exit_code == 0 and "12,525,312 parameters" in res.output and "head, neck" in res.output
    res = runner.invoke(cli, ["info", "--size", "n", "--kpts", "21", "--imgsz", "256"])
    assert res.exit_code == 0 and "kp0," in res.output and "kp20" in res.output and "keypoints (21)" in res.output
    res = runner.invoke(cli, ["info", "--size", "n", "--data", "crowdpose", "--imgsz", "256"])
    assert res.exit_code == 0 and "keypoints (14)" in res.output


def test_cli_info_errors():
    runner = CliRunner()
    res = runner.invoke(cli, ["info", "--size", "n", "--imgsz", "100"])
    assert res.exit_code == 2 and "multiple of 64" in res.output  # a usage error
    res = runner.invoke(cli, ["info", "--size", "n", "--data", "crowdpose", "--kpts", "17"])
    assert res.exit_code == 2 and "--kpts 17 contradicts --data crowdpose" in res.output  # a usage error too
    res = runner.invoke(cli, ["info", "--size", "q"])
    assert res.exit_code == 2


def test_cli_size_choices_match_model_sizes():
    assert MODEL_SIZES == list(SIZES)


def test_custom_schema_is_kept():
    schema = KeypointSchema(names=("a", "b", "c"), flip_index=(1, 0, 2), sigmas=(0.1, 0.1, 0.2))
    model = kapao_n(schema)
    assert model.schema is schema and model.layout.num_outputs == 5 + 4 + 6
    assert model.config["schema"]["kpt_names"] == ["a", "b", "c"]
