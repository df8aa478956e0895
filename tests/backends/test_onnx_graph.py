"""The in-memory ONNX graph: the frozen inference copy, the metadata entries, tracing and the head's node scope.

Exported files checked against torch (static/dynamic shapes, fp16, the CLI) are tested in tests/test_export.py.
"""
from __future__ import annotations

import json

import onnx
import pytest
import torch

from kapao.backends.onnx_graph import (
    INPUT_NAME,
    OUTPUT_NAME,
    DecodedOutput,
    export_metadata,
    head_scope,
    inference_copy,
    set_metadata,
    trace,
)
from kapao.backends.runtimes import ONNX_FORMAT
from kapao.errors import ConfigError
from kapao.models.network import build_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("n", 17).train()


def test_inference_copy_is_frozen_folded_eval_and_leaves_the_model_alone(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wrapper = inference_copy(model, torch.device("cpu"))
    assert isinstance(wrapper, DecodedOutput) and not wrapper.training and not wrapper.model.training
    assert not any(p.requires_grad for p in wrapper.parameters())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in wrapper.modules())  # Conv+BN folded
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref = model.eval()(x)[0]
        model.train()
        out = wrapper(x)
    assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-3, rtol=1e-3)  # folding keeps the outputs


def test_export_metadata_is_all_strings_and_reads_back(model):
    meta = export_metadata(model, (128, 96), dynamic=False, half=False, batch=2, opset=17, source="w.pt")
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert meta["format"] == ONNX_FORMAT and meta["size"] == "n" and meta["num_keypoints"] == "17"
    assert json.loads(meta["imgsz"]) == [128, 96] and json.loads(meta["batch"]) == 2 and meta["source"] == "w.pt"
    assert len(json.loads(meta["names"])) == 18  # the person class, then one per keypoint
    assert json.loads(export_metadata(model, (64, 64), dynamic=True, half=True, batch=4, opset=13)["batch"]) is None


def test_set_metadata_replaces_same_keys_and_keeps_the_others():
    proto = onnx.ModelProto()
    set_metadata(proto, {"a": "1", "b": "2"})
    set_metadata(proto, {"b": "3", "c": "4"})
    assert {p.key: p.value for p in proto.metadata_props} == {"a": "1", "b": "3", "c": "4"}
    assert len(proto.metadata_props) == 3


def test_trace_names_the_graph_and_keeps_the_head_under_its_scope(model):
    wrapper = inference_copy(model, torch.device("cpu"))
    graph = onnx.load_from_string(trace(wrapper, torch.zeros(1, 3, 64, 64), 17, dynamic=True))
    assert [i.name for i in graph.graph.input] == [INPUT_NAME] and [o.name for o in graph.graph.output] == [OUTPUT_NAME]
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "", "height", "width"]
    scope = head_scope(model)
    assert scope == f"/model/model.{len(model.model) - 1}/"
    assert any(n.name.startswith(scope) for n in graph.graph.node)


class _Tiny(torch.nn.Module):
    def forward(self, x):
        return (torch.nn.functional.silu(x).flatten(2).transpose(1, 2),)


@pytest.mark.filterwarnings("ignore:Exporting to ONNX opset version")
def test_trace_failure_is_one_config_error_naming_the_opset():
    with pytest.raises(ConfigError, match=r"ONNX export failed at opset 99 .*try the default --opset 17"):
        trace(DecodedOutput(_Tiny()), torch.zeros(1, 3, 8, 8), 99, dynamic=False)
