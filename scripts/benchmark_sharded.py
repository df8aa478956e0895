"""Sharded predict and val on this machine's CPU: 1 process x all cores vs N processes x cores/N threads.

Prints, per setting, the median over --repeats interleaved runs of: predict images/s (the frame loop, as
the CLI reports it), predict wall time (the whole command: start-up, model loading, merging) and val wall
time on coco-mini. The model is an untrained kapao of --size (no download); the images are coco-mini's,
resized, repeated to --images files. On a shared machine the numbers move with the others' load: compare
the ratios within one run only.

    python scripts/benchmark_sharded.py --images 40 --imgsz 384 --procs 2 --repeats 3
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("KAPAO_TEST_DATA", REPO.parent / "shared" / "data"))


def _kapao(args: list[str], procs: int) -> tuple[float, str]:
    """Wall seconds and output of `kapao ARGS` on `procs` processes (1: no torchrun)."""
    run = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs)] if procs > 1 else []
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, *run, "-m", "kapao", *args], env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stdout[-2000:] + out.stderr[-2000:])
    return time.perf_counter() - t0, out.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--imgsz", type=int, default=384)
    ap.add_argument("--size", default="s")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    from kapao.cfg.dataset import resolve_schema
    from kapao.models.network import build_model
    from kapao.weights.checkpoint import save_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = tmp / "w.pt"
        save_checkpoint(weights, build_model(a.size, resolve_schema(num_keypoints=17)).eval(), extra={"epoch": 0})
        src = tmp / "src"
        src.mkdir()
        images = sorted((DATA / "coco-mini" / "images").iterdir())
        for i in range(a.images):
            cv2.imwrite(str(src / f"{i:04d}.jpg"), cv2.imread(str(images[i % len(images)])))
        yaml = tmp / "coco-mini.yaml"
        yaml.write_text(f"base: coco\nname: coco-mini\npath: {DATA / 'coco-mini'}\nval: images\n"
                        "val_annotations: person_keypoints.json\n")
        common = ["--weights", str(weights), "--imgsz", str(a.imgsz), "--device", "cpu"]
        _kapao(["predict", str(src), *common, "--nosave", "--project", str(tmp / "warm")], 1)  # exports the ONNX cache
        rows: dict[int, dict[str, list[float]]] = {p: {"fps": [], "predict_s": [], "val_s": []} for p in (1, a.procs)}
        for r in range(a.repeats):
            for p in (1, a.procs):
                wall, out = _kapao(["predict", str(src), *common, "--nosave", "--project", str(tmp / f"p{p}r{r}")], p)
                rows[p]["fps"].append(float(re.search(r"\(([0-9.]+) fps", out).group(1)))
                rows[p]["predict_s"].append(wall)
                wall, _ = _kapao(["val", "--data", str(yaml), *common, "--batch", "1", "--workers", "0",
                                  "--project", str(tmp / f"v{p}r{r}")], p)
                rows[p]["val_s"].append(wall)
        cores = os.cpu_count()
        print(f"{a.images} images, kapao-{a.size} untrained, imgsz {a.imgsz}, {cores} CPUs, {a.repeats} interleaved repeats")
        print(f"{'setting':<28}{'predict img/s':>14}{'predict wall s':>16}{'val wall s (coco-mini)':>24}")
        for p, v in rows.items():
            name = f"{p} process{'es' if p > 1 else ''} x {max(1, cores // p)} thread{'s' if cores // p > 1 else ''}"
            print(f"{name:<28}{statistics.median(v['fps']):>14.2f}{statistics.median(v['predict_s']):>16.1f}"
                  f"{statistics.median(v['val_s']):>24.1f}")


if __name__ == "__main__":
    main()
