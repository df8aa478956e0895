"""Does the per-keypoint confidence separate labelled keypoints from unlabelled ones? (ROC AUC)

    nice -n 10 python scripts/kp_confidence_auc.py                       # train a memorised size n, then measure
    python scripts/kp_confidence_auc.py --weights runs/kp_auc/exp/train/weights/last.pt   # measure only

Without --weights a size-n model is trained from scratch on coco-mini ($KAPAO_TEST_DATA/coco-mini, or
--data) as a memorisation test: augmentation off, lr0 0.05, batch 4, --steps optimizer steps at --imgsz.
Then every pose of the split is matched to a ground-truth person (greedy by score, OKS >= --match-oks)
and, over the keypoints of the matched persons, the ROC AUC of the keypoint confidence separating
labelled (v > 0) from unlabelled (v = 0) keypoints is printed -- for the new confidence (every
keypoint) and for the old one (the fused score, 0 for unfused keypoints) on the same keypoints.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from _common import memorise, mini_yaml, test_data

from kapao.cfg.dataset import load_dataset_config
from kapao.cfg.settings import PREDICT_SETTINGS, VAL_SETTINGS
from kapao.eval.confidence import MATCH_OKS, predict_and_match, roc_auc
from kapao.eval.val import make_val_loader, protocol_for
from kapao.infer.predictor import KAPAO
from kapao.runtime import atomic_write, increment_run_dir

DATA = test_data()
SETTINGS = {"val": VAL_SETTINGS, "predict": PREDICT_SETTINGS}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=None, help="measure these weights (default: train a memorised size n)")
    ap.add_argument("--data", default=None, help="dataset YAML or name (default: coco-mini of $KAPAO_TEST_DATA)")
    ap.add_argument("--split", default="val", choices=["train", "val", "test"])
    ap.add_argument("--imgsz", type=int, default=256)
    ap.add_argument("--steps", type=int, default=500, help="training steps (= epochs of the 4-image set)")
    ap.add_argument("--settings", default="val", choices=sorted(SETTINGS))
    ap.add_argument("--conf", type=float, default=None, help="override the person score threshold of --settings")
    ap.add_argument("--match-oks", type=float, default=MATCH_OKS)
    ap.add_argument("--project", default="runs/kp_auc")
    ap.add_argument("--name", default="exp")
    args = ap.parse_args(argv)

    save_dir = increment_run_dir(args.project, args.name)
    data = args.data or str(mini_yaml(DATA / "coco-mini", save_dir / "coco-mini.yaml"))
    weights = args.weights or memorise(Path(data), save_dir, args.imgsz, args.steps, name="train", nosave=True)
    cfg = load_dataset_config(data)
    api = KAPAO(weights, device="cpu")
    loader = make_val_loader(cfg, args.split, api.check_imgsz(args.imgsz), 4)
    predictor = api.predictor(SETTINGS[args.settings].replace(conf=args.conf))
    out = predict_and_match(predictor, loader, protocol_for(loader.dataset), args.match_oks, progress=False)
    old = np.where(out.fused, out.confidence, 0.0)
    result = {
        "weights": str(weights), "data": str(data), "imgsz": args.imgsz, "settings": args.settings,
        "match_oks": args.match_oks, "matched_persons": out.pairs,
        "labelled": int(out.labelled.sum()), "unlabelled": int((~out.labelled).sum()),
        "fused": int(out.fused.sum()),
        "auc": roc_auc(out.confidence, out.labelled), "auc_old_confidence": roc_auc(old, out.labelled),
        "mean_confidence_labelled": float(out.confidence[out.labelled].mean()) if out.labelled.any() else None,
        "mean_confidence_unlabelled": float(out.confidence[~out.labelled].mean()) if (~out.labelled).any() else None,
    }
    with atomic_write(save_dir / "auc.json", "w") as f:
        json.dump(result, f, indent=1)
    print(f"{out.pairs} matched persons: {result['labelled']} labelled / {result['unlabelled']} unlabelled keypoints, "
          f"{result['fused']} fused")
    print(f"ROC AUC, labelled vs unlabelled: {result['auc']:.4f} (per-keypoint confidence), "
          f"{result['auc_old_confidence']:.4f} (old: fused score, else 0)")
    print(f"results in {save_dir}")
    return result


if __name__ == "__main__":
    main()
