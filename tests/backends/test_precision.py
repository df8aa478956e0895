"""The one --half/--int8 check: what it lets through and the sentences it says (exit codes follow the class)."""
from __future__ import annotations

import re

import pytest
import torch

from kapao.backends.precision import (
    PRECISIONS,
    WHY_CLI,
    WHY_EXPORT,
    PrecisionError,
    check_precision,
    precision_of,
)
from kapao.errors import ConfigError, WeightsError

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)  # only the device type is read: no GPU needed


def _raises(cls: type[Exception], message: str) -> pytest.RaisesContext:
    return pytest.raises(cls, match=f"^{re.escape(message)}$")


def test_what_runs():
    for precision in PRECISIONS:
        if precision != "bf16":  # the CPU's half precision
            check_precision(precision, GPU)
    check_precision("fp32", CPU, "openvino", supported=("fp32",))
    check_precision("int8", CPU, "onnxruntime", supported=("fp32", "int8"))
    check_precision("fp16", GPU, "torch", supported=("fp32", "fp16"))
    check_precision("fp16", GPU, file="m.onnx", file_precision="fp16")
    check_precision("fp32", GPU, file="m.onnx", file_precision="fp16")
    check_precision("fp32", CPU, file="m.onnx", file_precision="int8")


@pytest.mark.parametrize(("why", "said"), [
    ({}, "fp16 is not faster on CPU"), ({"why": WHY_EXPORT}, "fp16 ONNX models are for GPUs"),
    ({"why": WHY_CLI}, "fp16 is for GPUs"),
])
def test_fp16_needs_cuda_in_each_callers_words(why: dict, said: str):
    with _raises(PrecisionError, f"--half needs a CUDA device ({said}); drop --half or use --device 0") as caught:
        check_precision("fp16", CPU, **why)
    assert caught.value.option == "--half" and caught.value.reason.startswith("needs a CUDA device")
    assert isinstance(caught.value, ConfigError)  # exit 1 from the library; the CLI makes it a usage error
    with pytest.raises(PrecisionError):
        check_precision("fp16", torch.device("mps"), "torch", supported=PRECISIONS)


def test_a_precision_the_runtime_does_not_run():
    with _raises(PrecisionError, "--half runs torch (or an fp16 .onnx export) on CUDA; use --backend torch, "
                                 "not onnxruntime"):
        check_precision("fp16", GPU, "onnxruntime", supported=("fp32", "int8"))
    with _raises(PrecisionError, "--int8 runs on onnxruntime; use --backend onnxruntime or auto (not openvino)"):
        check_precision("int8", CPU, "openvino", supported=("fp32",))
    with _raises(ConfigError, "precision 'fp8': choose one of fp32, fp16, bf16, int8"):
        check_precision("fp8", GPU)


def test_an_exported_file_runs_at_its_own_precision():
    with _raises(WeightsError, "m.onnx is an fp16 (--half) export, which needs onnxruntime with CUDA; "
                               "export without --half for the CPU"):
        check_precision("fp32", CPU, file="m.onnx", file_precision="fp16")
    with _raises(PrecisionError, "--half: m.onnx is an fp32 ONNX model; export it with --half (CUDA) or drop --half"):
        check_precision("fp16", GPU, file="m.onnx", file_precision="fp32")


def test_precision_of_the_flags():
    assert [precision_of(h, i) for h, i in [(False, False), (True, False), (False, True)]] == ["fp32", "fp16", "int8"]
    with _raises(PrecisionError, "--int8 and --half exclude each other (int8 is for CPUs, fp16 for GPUs); choose one"):
        precision_of(True, True)


def test_bf16_where_the_cpu_flags_say_so(monkeypatch: pytest.MonkeyPatch):
    """--half is bf16 on a CPU with AVX512_BF16 or AMX (read from the CPU flags, injected here), else fp16."""
    from kapao.backends.precision import half_precision

    assert half_precision(CPU, {"avx512_bf16"}) == "bf16" and half_precision(CPU, {"amx_bf16"}) == "bf16"
    assert half_precision(CPU, {"avx512f"}) == "fp16" and half_precision(GPU, {"avx512_bf16"}) == "fp16"
    monkeypatch.setattr("kapao.runtime.cpu_flags", lambda: frozenset({"avx512_bf16"}))
    check_precision("bf16", CPU, "torch-cl", supported=("fp32", "fp16", "bf16"))
    with _raises(PrecisionError, "--half on the CPU runs torch in bf16; use --backend auto or torch (not onnxruntime)"):
        check_precision("bf16", CPU, "onnxruntime", supported=("fp32", "int8"))
    monkeypatch.setattr("kapao.runtime.cpu_flags", lambda: frozenset({"avx2"}))
    with _raises(PrecisionError, "--half needs a CUDA device (fp16) or a CPU with native bf16 (AVX512_BF16 or AMX; "
                                 "this CPU has neither); drop --half or use --device 0"):
        check_precision("bf16", CPU)
