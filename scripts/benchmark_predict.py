"""Predict benchmark: per-image pre-process / inference / post-process ms and end-to-end video fps.

    python scripts/benchmark_predict.py [--weights W] [--sizes s] [--imgsz 640 1280] [--device cpu]

Runs `KAPAO.run` (the code behind `kapao predict`) on the 720p test video, writing the drawn video and
JSON like a user run. Without --weights the network is randomly initialised (same cost per forward;
post-processing then sees few detections, so its time is a lower bound).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _common import test_data

from kapao.cfg.settings import PREDICT_SETTINGS
from kapao.infer.predictor import KAPAO
from kapao.models.network import build_model

DATA = test_data()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=None, help="checkpoint or name (default: random init of --sizes)")
    ap.add_argument("--sizes", nargs="+", default=["s"])
    ap.add_argument("--imgsz", nargs="+", type=int, default=[640, 1280])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--video", default=str(DATA / "videos" / "posetrack-000001.mp4"))
    ap.add_argument("--repeats", type=int, default=2, help="video passes; the first one is warm-up")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, video {args.video}\n")
    print("| model | imgsz | pre-process ms | inference ms | post-process ms | end-to-end fps |")
    print("|---|---:|---:|---:|---:|---:|")
    for size in ([None] if args.weights else args.sizes):
        model = args.weights or build_model(size, 17)
        api = KAPAO(model, device=args.device)
        for imgsz in args.imgsz:
            with tempfile.TemporaryDirectory() as tmp:
                for _ in range(args.repeats):  # the last pass is reported
                    run = api.run(args.video, imgsz=imgsz, settings=PREDICT_SETTINGS, project=tmp, keep_results=False)
            ms = run.timing.per_image_ms()
            name = Path(args.weights).stem if args.weights else f"kapao-{size} (random init)"
            print(f"| {name} | {imgsz} | {ms['pre']:.1f} | {ms['infer']:.1f} | {ms['post']:.2f} | "
                  f"{run.frames / run.seconds:.2f} |")


if __name__ == "__main__":
    main()
