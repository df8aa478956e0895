"""Forward speed of every CPU backend of kapao, to choose kapao.backends.dispatch.DEFAULT_CPU_BACKEND / DEFAULT_SHAPES.

    python scripts/benchmark_backends.py [--size s] [--imgsz 640 1280] [--runs 6] [--weights FILE]
                                         [--calib DIR] [--calib-images 4] [--backends ...] [--quick]

Rows, all in this one process, on one input per image size (the first frame of
$KAPAO_TEST_DATA/videos/posetrack-000001.mp4, 1280x720, letterboxed as predict does: 1280 -> 1280x768,
640 -> 640x384):

* matmul        -- a 2048^3 fp32 torch matmul: what the machine can do (GFLOP/s);
* torch         -- torch eager NCHW, Conv+BN folded (the plain torch path);
* torch-cl      -- the same with channels_last;
* onnxruntime / onnxruntime-fixed -- the cached dynamic-shape export, and one fixed to the input's shape;
* openvino / openvino-fixed       -- the same files compiled by OpenVINO (fp32);
* onnxruntime-int8 / onnxruntime-int8-fixed -- the int8 QDQ model calibrated on --calib (--calib-images).

Each row: median forward ms of --runs after one warm-up call, GFLOP/s (the network's convolution
FLOPs at that input / median time), and the largest coordinate difference to the torch row
(pixels). The exports go to a temporary cache folder (not the user's) and are not timed. The fastest
fp32 row at 1280 is the one to name in kapao/backends/dispatch.py (DEFAULT_CPU_BACKEND; "-fixed" winning
means DEFAULT_SHAPES = "fixed"). --quick: size n at 128, 2 runs (checks that every row works).
Run it alone on an idle machine.
"""
from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import torch
from _common import MATMUL_N, matmul_gflops, median_ms, test_data

TEST_DATA = test_data()
ROWS = ("torch", "torch-cl", "onnxruntime", "onnxruntime-fixed", "openvino", "openvino-fixed",
        "onnxruntime-int8", "onnxruntime-int8-fixed")


def network_input(imgsz: int) -> torch.Tensor:
    """(1, 3, H, W) float in [0, 1]: the test video's first frame letterboxed as predict does (random if absent)."""
    from kapao.data.sources import VideoReader
    from kapao.infer.predictor import prepare_batch

    video = TEST_DATA / "videos" / "posetrack-000001.mp4"
    if video.is_file():
        reader = VideoReader(str(video))
        frame = next(iter(reader)).image
        reader.close()
    else:
        frame = (np.random.default_rng(0).random((720, 1280, 3)) * 255).astype(np.uint8)
    x, _ = prepare_batch([frame], imgsz)
    return x.float() / 255.0


def make_backend(row: str, model: torch.nn.Module, calib: object) -> object:
    from kapao.backends.dispatch import RuntimeSpec, load_backend

    shapes = "fixed" if row.endswith("-fixed") else "dynamic"
    name = row.removesuffix("-fixed").removesuffix("-int8")
    return load_backend(model, RuntimeSpec("cpu", backend=name, int8=calib if "int8" in row else None), shapes=shapes)


def bench(args: argparse.Namespace) -> None:
    from kapao.backends.int8 import Int8Calibration
    from kapao.cfg.schema import HeadLayout
    from kapao.models.network import build_model, count_flops
    from kapao.weights.loader import load_model

    torch.manual_seed(0)
    model = load_model(args.weights, device="cpu")[0] if args.weights else build_model(args.size, 17)
    model.eval()
    layout = HeadLayout(model.schema.num_keypoints)
    print(f"kapao-{model.size}, torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
          f"{os.cpu_count()} CPUs; median of {args.runs} runs")
    print(f"matmul {MATMUL_N}^3 fp32: {matmul_gflops(torch.device('cpu'), args.runs):.1f} GFLOP/s")
    print(f"{'backend':<24} {'input':>10} {'ms':>9} {'GFLOP/s':>8} {'max coord diff px':>18}")
    for imgsz in args.imgsz:
        x = network_input(imgsz)
        h, w = x.shape[-2:]
        gflops = count_flops(model, (h, w))
        calib = Int8Calibration.from_spec(args.calib, imgsz, args.calib_images)
        ref = None
        for row in args.backends:
            try:
                backend = make_backend(row, model, calib)
            except Exception as e:  # noqa: BLE001 - a missing optional runtime skips its row
                print(f"{row:<24} {f'{h}x{w}':>10}  skipped: {e}")
                continue
            with torch.inference_mode():
                out = backend(x)
                ms = median_ms(lambda: backend(x), args.runs)
            ref = out if row == "torch" else ref
            d = "" if ref is None or row == "torch" else \
                f"{float(torch.cat(((out - ref)[..., layout.box], (out - ref)[..., layout.kpt]), -1).abs().max()):.2e}"
            print(f"{row:<24} {f'{h}x{w}':>10} {ms:9.1f} {gflops / ms * 1000:8.1f} {d:>18}", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="s", choices=["n", "s", "m", "l", "x"])
    p.add_argument("--weights", default=None, help="a checkpoint or name (default: random-init kapao-SIZE, 17 keypoints)")
    p.add_argument("--imgsz", type=int, nargs="+", default=[1280, 640])
    p.add_argument("--runs", type=int, default=6)
    p.add_argument("--backends", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--calib", default=str(TEST_DATA / "coco-mini" / "images"), help="int8 calibration images")
    p.add_argument("--calib-images", type=int, default=4)
    p.add_argument("--quick", action="store_true", help="size n at 128, 2 runs: a smoke test")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.imgsz, args.runs = "n", [128], 2
    os.environ.setdefault("KAPAO_CACHE_DIR", tempfile.mkdtemp(prefix="kapao-bench-"))
    bench(args)


if __name__ == "__main__":
    main()
