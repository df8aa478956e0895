"""Training throughput (images/s) of the trainer's per-batch work on synthetic batches.

    python scripts/benchmark_train.py [--device cpu|0] [--iters 4] [--warmup 1] [--threads N]

Times what `kapao train` does per batch (kapao.train.update.BatchUpdater): forward, loss, backward, and every
`accumulate` batches (nominal batch 64) the SGD step and the EMA update. Data loading is excluded
(scripts/benchmark_loader.py measures it). Synthetic batches: random images, 6 persons per image
with all 17 keypoints visible (plus their keypoint objects). Cases: sizes n and s at 640 px, batch 8,
fp32 on the CPU; with CUDA, also s and m at 1280 px with AMP. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from kapao.cfg.dataset import load_dataset_config
from kapao.cfg.settings import Hyp
from kapao.data.augment import Instances
from kapao.data.dataset import collate, encode_targets
from kapao.models.loss import KapaoLoss
from kapao.models.network import build_model
from kapao.runtime import select_device
from kapao.train.optim import ModelEMA, accumulate_steps, build_optimizer
from kapao.train.update import BatchUpdater

PERSONS = 6


def synthetic_batch(batch: int, imgsz: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (B, 3, S, S) uint8, targets (M, 6 + 3K)) with PERSONS random persons per image."""
    schema = load_dataset_config("coco").schema
    k = schema.num_keypoints
    items = []
    for _ in range(batch):
        wh = rng.uniform(0.1, 0.5, (PERSONS, 2)) * imgsz
        xy = rng.uniform(0, imgsz - wh)
        boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
        kpts = np.ones((PERSONS, k, 3), np.float32)
        kpts[..., :2] = xy[:, None] + rng.uniform(0, 1, (PERSONS, k, 2)) * wh[:, None]
        inst = Instances(boxes, kpts, np.ones(PERSONS, bool))
        img = torch.from_numpy(rng.integers(0, 255, (3, imgsz, imgsz), dtype=np.uint8))
        items.append((img, torch.from_numpy(encode_targets(inst, (imgsz, imgsz), schema)), {}))
    images, targets, _ = collate(items)
    return images, targets


def throughput(size: str, imgsz: int, batch: int, device: torch.device, amp: bool, iters: int,
               warmup: int) -> tuple[float, float]:
    """(images/s, ms per batch) over `iters` batches after `warmup` batches."""
    torch.manual_seed(0)
    hyp = Hyp()
    model = build_model(size, 17).to(device).train()
    accumulate = accumulate_steps(hyp, batch)
    optimizer = build_optimizer(model, hyp, batch, accumulate)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    updater = BatchUpdater(model, KapaoLoss(model, hyp, imgsz), optimizer, scaler, ModelEMA(model), device, amp)
    images, targets = synthetic_batch(batch, imgsz, np.random.default_rng(0))

    def run(n: int, offset: int) -> None:
        for i in range(offset, offset + n):
            updater.forward_backward(images, targets)
            if (i + 1) % accumulate == 0:
                updater.optimizer_step()

    run(warmup, 0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    run(iters, warmup)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    return iters * batch / dt, 1000 * dt / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="", help="cpu, a GPU index, or '' (GPU if any)")
    ap.add_argument("--iters", type=int, default=4, help="timed batches per case")
    ap.add_argument("--warmup", type=int, default=1, help="untimed batches first")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    cases = [("n", 640, False), ("s", 640, False)]
    if device.type == "cuda":
        cases = [("n", 640, True), ("s", 640, True), ("s", 1280, True), ("m", 1280, True)]
        name = torch.cuda.get_device_name(device)
        warmup = max(args.warmup, 3)  # cuDNN autotuning and allocator warm-up
        torch.backends.cudnn.benchmark = True
    else:
        name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        warmup = args.warmup
    print(f"training throughput on {device.type} ({name}), torch {torch.__version__}, batch {args.batch}, "
          f"{args.iters} timed batches after {warmup}\n")
    print("| size | imgsz | batch | device | precision | images/s | ms/batch |")
    print("|---|---|---|---|---|---|---|")
    for size, imgsz, amp in cases:
        ips, ms = throughput(size, imgsz, args.batch, device, amp, args.iters, warmup)
        precision = "AMP fp16" if amp else "fp32"
        print(f"| {size} | {imgsz} | {args.batch} | {device.type} | {precision} | {ips:.2f} | {ms:.0f} |", flush=True)


if __name__ == "__main__":
    main()
