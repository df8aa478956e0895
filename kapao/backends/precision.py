"""Which numeric precision can run where: the one check behind ``--half`` and ``--int8``.

fp32 runs everywhere; fp16 (``--half``) needs a CUDA device and a runtime that runs weights in fp16 (torch)
or an fp16 export; on a CPU with native bfloat16 (AVX512_BF16 or AMX in its flags) ``--half`` means bf16
(torch autocast, :func:`half_precision`); int8 (``--int8``) is a statically quantised ONNX model
(onnxruntime). The runtimes and the precisions each runs are the rows of
:data:`kapao.backends.dispatch.RUNTIMES`; the CLI, the dispatcher, the backends and the exporter all ask
:func:`check_precision`, so a wrong request gets the same sentence wherever it is found.
"""
from __future__ import annotations

from typing import Sequence

import torch

from kapao.errors import ConfigError, WeightsError
from kapao.runtime import cpu_bf16

PRECISIONS = ("fp32", "fp16", "bf16", "int8")

# Why fp16 wants CUDA, as each caller words it: a torch model (the default), an fp16 ONNX export, the CLI.
WHY_TORCH = "fp16 is not faster on CPU"
WHY_EXPORT = "fp16 ONNX models are for GPUs"
WHY_CLI = "fp16 is for GPUs"


class PrecisionError(ConfigError):
    """A precision that cannot run as asked. ``option`` (e.g. ``--half``) and ``reason`` (the rest of the
    sentence) are kept apart so that the CLI can hand ``reason`` to click, which names the option itself."""

    def __init__(self, option: str, reason: str) -> None:
        super().__init__(f"{option} {reason}")
        self.option, self.reason = option, reason


def precision_of(half: bool, int8: bool) -> str:
    """``fp16`` / ``int8`` / ``fp32`` from the two flags; PrecisionError when both are set (the exporter)."""
    if half and int8:
        raise PrecisionError("--int8 and --half", "exclude each other (int8 is for CPUs, fp16 for GPUs); choose one")
    return "fp16" if half else "int8" if int8 else "fp32"


def half_precision(device: torch.device, flags: frozenset[str] | set[str] | None = None) -> str:
    """What ``--half`` runs on `device`: ``bf16`` on a CPU with native bf16 (:func:`kapao.runtime.cpu_bf16`
    of `flags`, default this CPU's), else ``fp16`` (which :func:`check_precision` refuses off CUDA)."""
    return "bf16" if device.type == "cpu" and cpu_bf16(flags) else "fp16"


def check_precision(precision: str, device: torch.device, runtime: str | None = None, *,
                    supported: Sequence[str] = PRECISIONS, file: str | None = None, file_precision: str | None = None,
                    why: str = WHY_TORCH) -> None:
    """Raise when `precision` cannot run on `device` with `runtime`, else return.

    ``supported``: the precisions `runtime` runs weights at (its row's ``precisions``); ``file`` and
    ``file_precision``: an exported model that is run as it is, at its own precision (then asking for fp16
    needs an fp16 export, and an fp16 export needs CUDA). ``why``: the caller's words for why fp16 wants CUDA.

    Order (the first that applies is raised): fp16 without CUDA, an fp16 export off CUDA (WeightsError), fp16
    asked of an fp32 export, a precision the runtime does not run (``--half runs torch ...``, ``--int8 runs
    on onnxruntime ...``). PrecisionError is a ConfigError: exit 1 from the library, 2 where the CLI
    turns it into a usage error before loading anything.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise PrecisionError("--half", f"needs a CUDA device ({why}); drop --half or use --device 0")
    if precision == "bf16" and not (device.type == "cpu" and cpu_bf16()):
        where = "this CPU has neither" if device.type == "cpu" else f"not {device.type}"
        raise PrecisionError("--half", "needs a CUDA device (fp16) or a CPU with native bf16 (AVX512_BF16 or "
                                       f"AMX; {where}); drop --half or use --device 0")
    if file is not None:
        if file_precision == "fp16" and device.type != "cuda":
            raise WeightsError(f"{file} is an fp16 (--half) export, which needs onnxruntime with CUDA; "
                               "export without --half for the CPU")
        if precision == "fp16" and file_precision != "fp16":
            raise PrecisionError("--half:", f"{file} is an fp32 ONNX model; export it with --half (CUDA) or drop --half")
        return
    if precision not in supported:
        if precision == "fp16":
            raise PrecisionError("--half", f"runs torch (or an fp16 .onnx export) on CUDA; use --backend torch, "
                                           f"not {runtime}")
        if precision == "bf16":
            raise PrecisionError("--half", f"on the CPU runs torch in bf16; use --backend auto or torch "
                                           f"(not {runtime})")
        raise PrecisionError("--int8", f"runs on onnxruntime; use --backend onnxruntime or auto (not {runtime})")
