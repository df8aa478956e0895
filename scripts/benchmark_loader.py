"""Training data-loader throughput (images/s, mosaic + affine + HSV + flip) on coco-mini.

    python scripts/benchmark_loader.py [--data-root ../shared/data] [--imgsz 640 1280] [--workers 0 1 2]

Prints a markdown table. Worker start-up and the first batches are excluded (--warmup).
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch
from _common import test_data
from torch.utils.data import RandomSampler

from kapao.cfg.dataset import load_dataset_config
from kapao.cfg.schema import DatasetConfig
from kapao.data.dataset import PoseDataset, build_dataloader


def coco_mini_config(data_root: Path) -> DatasetConfig:
    """coco-mini (4 images, 14 persons) as the train split, with the built-in COCO keypoint schema."""
    root = data_root / "coco-mini"
    if not (root / "person_keypoints.json").is_file():
        raise SystemExit(f"coco-mini not found under {data_root}; pass --data-root or set KAPAO_TEST_DATA")
    return DatasetConfig(name="coco-mini", root=root, images={"train": root / "images"},
                         annotations={"train": root / "person_keypoints.json"},
                         schema=load_dataset_config("coco").schema, source=str(root))


def throughput(cfg: DatasetConfig, imgsz: int, workers: int, batch_size: int, batches: int, warmup: int) -> float:
    """Images per second over `batches` batches after `warmup` batches."""
    ds = PoseDataset(cfg, "train", imgsz, augment=True, batch_size=batch_size)
    sampler = RandomSampler(ds, replacement=True, num_samples=(batches + warmup) * batch_size,
                            generator=torch.Generator().manual_seed(0))
    loader = build_dataloader(ds, batch_size, workers, shuffle=False, sampler=sampler, seed=0)
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    n = sum(len(next(it)[0]) for _ in range(batches))
    rate = n / (time.perf_counter() - t0)
    del it, loader
    return rate


def main() -> None:
    default_root = test_data()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", type=Path, default=default_root)
    ap.add_argument("--imgsz", type=int, nargs="+", default=[640, 1280])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()
    cfg = coco_mini_config(args.data_root)
    print(f"coco-mini, batch {args.batch_size}, {args.batches} timed batches, {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}\n")
    print("| imgsz | workers | images/s | ms/image |")
    print("|---:|---:|---:|---:|")
    for imgsz in args.imgsz:
        for w in args.workers:
            rate = throughput(cfg, imgsz, w, args.batch_size, args.batches, args.warmup)
            print(f"| {imgsz} | {w} | {rate:.1f} | {1000 / rate:.1f} |", flush=True)


if __name__ == "__main__":
    main()
