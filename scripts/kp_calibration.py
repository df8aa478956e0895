"""Calibration of the per-keypoint confidence: reliability diagram + expected calibration error (ECE).

    python scripts/kp_calibration.py --data coco --weights kapao_s_coco --imgsz 1280
    python scripts/kp_calibration.py --data mydata.yaml --weights runs/train/exp/weights/best.pt --split val

Predicts the dataset split (kapao's own inference path), matches each predicted pose to a ground-truth
person (greedy by score, OKS >= --match-oks), and judges every LABELLED keypoint of a matched person:
correct when its keypoint similarity exp(-d^2 / (2 s^2 k^2)) >= --correct-ks (0.5), with the dataset's
sigmas (k = 2 sigma) and the person's area (s^2). A calibrated confidence c is correct with probability c.
Writes reliability.png and calibration.json into runs/calibration/expN and prints the ECE for all
keypoints, the fused ones and the unfused ones.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from kapao.cfg.dataset import load_dataset_config
from kapao.cfg.settings import PREDICT_SETTINGS, VAL_SETTINGS
from kapao.eval.confidence import CORRECT_KS, MATCH_OKS, Reliability, predict_and_match, reliability, roc_auc
from kapao.eval.val import make_val_loader, protocol_for
from kapao.infer.predictor import KAPAO
from kapao.runtime import atomic_write, increment_run_dir
from kapao.weights.checkpoint import check_compatible

SETTINGS = {"val": VAL_SETTINGS, "predict": PREDICT_SETTINGS}


def plot(curves: dict[str, Reliability], path: Path, title: str) -> None:
    """Reliability diagram: fraction correct against mean confidence per bin, the diagonal, ECE; counts below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5, 6.5), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfectly calibrated")
    for name, r in curves.items():
        ok = r.count > 0
        ax.plot(r.confidence[ok], r.accuracy[ok], "o-", label=f"{name} (ECE {r.ece_text()}, n={int(r.count.sum())})")
        centres = (r.edges[:-1] + r.edges[1:]) / 2
        hist.bar(centres, r.count, width=r.edges[1] - r.edges[0], alpha=0.4, label=name)
    ax.set_ylabel("fraction correct (keypoint similarity >= threshold)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    hist.set_xlabel("keypoint confidence")
    hist.set_ylabel("keypoints")
    if any(r.count.any() for r in curves.values()):
        hist.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="dataset: built-in name (coco, crowdpose) or YAML")
    ap.add_argument("--weights", required=True, help="checkpoint, official .pt, name or .onnx")
    ap.add_argument("--split", default="val", choices=["train", "val", "test"])
    ap.add_argument("--imgsz", type=int, default=1280)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default=None)
    ap.add_argument("--settings", default="val", choices=sorted(SETTINGS),
                    help="inference thresholds: kapao val's (default) or kapao predict's")
    ap.add_argument("--bins", type=int, default=10)
    ap.add_argument("--conf", type=float, default=None, help="override the person score threshold of --settings")
    ap.add_argument("--match-oks", type=float, default=MATCH_OKS)
    ap.add_argument("--correct-ks", type=float, default=CORRECT_KS)
    ap.add_argument("--project", default="runs/calibration")
    ap.add_argument("--name", default="exp")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    cfg = load_dataset_config(args.data)
    api = KAPAO(args.weights, device=args.device)
    check_compatible(api.schema, cfg.schema)
    loader = make_val_loader(cfg, args.split, api.check_imgsz(args.imgsz), args.batch)
    predictor = api.predictor(SETTINGS[args.settings].replace(conf=args.conf))
    out = predict_and_match(predictor, loader, protocol_for(loader.dataset), args.match_oks,
                            progress=not args.no_progress)
    lab = out.labelled
    correct = out.similarity[lab] >= args.correct_ks
    conf, fused = out.confidence[lab], out.fused[lab]
    curves = {"all": reliability(conf, correct, args.bins),
              "fused": reliability(conf[fused], correct[fused], args.bins),
              "unfused": reliability(conf[~fused], correct[~fused], args.bins)}
    save_dir = increment_run_dir(args.project, args.name)
    title = (f"{Path(str(args.weights)).name} on {cfg.name}/{args.split} @ {args.imgsz} ({args.settings} settings)\n"
             f"{out.pairs} matched persons, OKS >= {args.match_oks}; correct: ks >= {args.correct_ks}")
    plot(curves, save_dir / "reliability.png", title)
    summary = {
        "weights": str(args.weights), "data": cfg.name, "split": args.split, "imgsz": args.imgsz,
        "settings": args.settings, "match_oks": args.match_oks, "correct_ks": args.correct_ks,
        "matched_persons": out.pairs, "labelled_keypoints": int(lab.sum()),
        "auc_correct": roc_auc(conf, correct), "auc_labelled_vs_unlabelled": roc_auc(out.confidence, lab),
        **{name: {"ece": r.ece if r.defined else None, "keypoints": int(r.count.sum()), "edges": r.edges.tolist(),
                  "count": r.count.tolist(),
                  "confidence": np.nan_to_num(r.confidence, nan=-1).tolist(),
                  "accuracy": np.nan_to_num(r.accuracy, nan=-1).tolist()} for name, r in curves.items()},
    }
    with atomic_write(save_dir / "calibration.json", "w") as f:
        json.dump(summary, f, indent=1)
    print(f"{out.pairs} matched persons, {int(lab.sum())} labelled keypoints "
          f"({int(fused.sum())} fused, {int((~fused).sum())} unfused)")
    for name, r in curves.items():
        print(f"ECE {name:8s} {r.ece:.4f}  ({int(r.count.sum())} keypoints)" if r.defined else
              f"ECE {name:8s} undefined  (0 keypoints)")
    print(f"ROC AUC of confidence for correct vs wrong keypoints: {summary['auc_correct']:.4f}")
    print(f"results in {save_dir}")
    return save_dir


if __name__ == "__main__":
    main()
