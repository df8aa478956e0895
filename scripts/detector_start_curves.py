"""Training losses from a YOLOv5 detector start vs from scratch, on coco-mini (no GPU, no download).

    python scripts/detector_start_curves.py [--pretrain-epochs 40] [--epochs 6] [--imgsz 192]

The real release files (yolov5s6.pt …) cannot be fetched here, so the starts are stand-in release
files in their exact format (pickled YOLOv5 v5.0 modules, FP16; tests/weights/yolov5_standin.py):

* learned: a kapao-s trained --pretrain-epochs on the 4 coco-mini images (augmentation off), its
  backbone and neck written into a YOLOv5-s6 detector file (80-class head, so the head's output
  convolutions are not transferred back) — shows the transfer puts learned weights where they belong;
* random-standin: a release-format file of random weights (seed 1) — the file path with no knowledge;
* scratch: ``--weights ''``.

Each then trains --epochs on coco-mini (lr0 0.01, augmentation off, batch 4). Printed: the
"Transferred N/M" lines and a table of the mean train losses (box/obj/cls/kp) per epoch.
"""
from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = Path(os.environ.get("KAPAO_TEST_DATA", REPO.parent / "shared" / "data"))
NO_AUG = {"mosaic": 0, "fliplr": 0, "scale": 0, "translate": 0, "hsv_h": 0, "hsv_s": 0, "hsv_v": 0}
TERMS = ("box", "obj", "cls", "kp")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrain-epochs", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--imgsz", type=int, default=192)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from kapao.train.run import TrainArgs
    from kapao.train.trainer import train
    from tests.weights.yolov5_standin import save_release_file

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "coco-mini.yaml"
        splits = "".join(f"{s}: images\n{s}_annotations: person_keypoints.json\n" for s in ("train", "val"))
        data.write_text(f"base: coco\nname: coco-mini\npath: {TEST_DATA / 'coco-mini'}\n{splits}")
        base = dict(data=str(data), size="s", imgsz=args.imgsz, batch=4, workers=0, device="cpu", noval=True,
                    plots=False, project=str(tmp / "runs"), seed=0)
        pre = train(TrainArgs(**base, epochs=args.pretrain_epochs, weights="", name="pretrain", hyp_overrides={
            "nominal_batch": 4, "warmup_epochs": 0, "warmup_min_iters": 5, "lr0": 0.05, **NO_AUG}))
        learned = torch.load(pre / "weights" / "last.pt", weights_only=True)["state_dict"]
        starts = {"learned": str(save_release_file(tmp / "learned_s6.pt", "s", seed=1, weights=learned)),
                  "random-standin": str(save_release_file(tmp / "random_s6.pt", "s", seed=1)), "scratch": ""}
        hyp = {"nominal_batch": 4, "warmup_epochs": 0, "warmup_min_iters": 2, "lr0": 0.01, **NO_AUG}
        rows = {}
        for name, weights in starts.items():
            run = train(TrainArgs(**base, epochs=args.epochs, weights=weights, name=name, hyp_overrides=hyp))
            with open(run / "results.csv", newline="") as f:
                rows[name] = list(csv.DictReader(f))
    print("\n| epoch | " + " | ".join(f"{n} box/obj/cls/kp" for n in rows) + " |")
    print("|---" * (len(rows) + 1) + "|")
    for e in range(args.epochs):
        cells = ["/".join(f"{float(rows[n][e]['train/' + t]):.4f}" for t in TERMS) for n in rows]
        print(f"| {e} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
