"""How far int8 and bf16 move kapao's poses: OKS AP of their poses against the fp32 poses taken as ground truth.

    python scripts/int8_agreement.py --weights runs/train/expN/weights/last.pt [--imgsz 640]
    python scripts/int8_agreement.py [--train-epochs 800] [--imgsz 192]     # memorise size n on coco-mini first

On coco-mini (4 images, $KAPAO_TEST_DATA): a model trained on those images (so that it finds the
people; --weights, or trained here with --train-epochs) is run through onnxruntime in fp32 and as the
int8 model calibrated on the same images (--calib-images), and (on a CPU with native bf16) by torch in
bfloat16 as `--half` runs it, all at --imgsz with the val settings. The fp32 poses above --gt-conf become
the ground truth (every keypoint labelled, area = box area), and the int8 (bf16) poses are evaluated
against the onnxruntime (torch) fp32 poses with kapao.eval.metrics (COCO protocol, the schema's OKS
sigmas). Printed: that AP/AP50/AP75, the same for torch-vs-onnxruntime fp32 as a control (should be
1.0), and the largest raw-output differences vs fp32 (coordinates in network-input pixels, scores).
The numbers go into the README sections 'int8' and 'bf16' and the --int8 / --half help.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
from pathlib import Path

import torch
from _common import memorise, mini_yaml, test_data

TEST_DATA = test_data()


def ground_truth(images: list[tuple[int, tuple[int, int]]], poses: dict[int, object], min_score: float) -> object:
    """A pycocotools COCO of `poses` (image id -> Poses) above `min_score`: every keypoint labelled (v=2)."""
    from pycocotools.coco import COCO

    anns = []
    for image_id, _ in images:
        p = poses[image_id]
        for box, score, kpts in zip(p.boxes.tolist(), p.scores.tolist(), p.keypoints.tolist()):
            if score < min_score:
                continue
            w, h = box[2] - box[0], box[3] - box[1]
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0, "area": w * h,
                         "bbox": [box[0], box[1], w, h], "keypoints": [v for x, y, _ in kpts for v in (x, y, 2)]})
    coco = COCO()
    coco.dataset = {"images": [{"id": i, "height": hw[0], "width": hw[1]} for i, hw in images], "annotations": anns,
                    "categories": [{"id": 1, "name": "person"}]}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
        coco.createIndex()
    return coco


def agreement(reference: dict[int, object], other: dict[int, object], images: list, schema: object,
              min_score: float) -> dict[str, float]:
    from kapao.eval.metrics import evaluate

    gt = ground_truth(images, reference, min_score)
    results = [r for image_id, _ in images for r in other[image_id].to_coco(image_id)]
    return evaluate(gt, results, schema)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=None, help="a model trained on coco-mini (else --train-epochs)")
    p.add_argument("--train-epochs", type=int, default=800, help="steps of the memorisation (batch 4 = all images)")
    p.add_argument("--imgsz", type=int, default=192, help="train and inference size")
    p.add_argument("--calib-images", type=int, default=4)
    p.add_argument("--gt-conf", type=float, default=0.5, help="fp32 poses above this score are the ground truth")
    args = p.parse_args(argv)
    os.environ.setdefault("KAPAO_CACHE_DIR", tempfile.mkdtemp(prefix="kapao-int8-"))

    from kapao.backends.int8 import Int8Calibration
    from kapao.cfg.schema import HeadLayout
    from kapao.cfg.settings import VAL_SETTINGS
    from kapao.data.sources import load_image
    from kapao.infer.predictor import KAPAO, prepare_batch
    from kapao.runtime import cpu_bf16

    folder = TEST_DATA / "coco-mini" / "images"
    weights = args.weights
    if weights is None:
        project = Path(tempfile.mkdtemp(prefix="kapao-mem-"))
        data = mini_yaml(TEST_DATA / "coco-mini", project / "coco-mini.yaml", ("train", "val"))
        weights = memorise(data, project, args.imgsz, args.train_epochs, patience=0)
    runs = {"torch": KAPAO(weights, "cpu", backend="torch"), "fp32": KAPAO(weights, "cpu", backend="onnxruntime"),
            "int8": KAPAO(weights, "cpu", backend="onnxruntime",
                          int8=Int8Calibration.from_spec(folder, args.imgsz, args.calib_images))}
    if cpu_bf16():
        runs["bf16"] = KAPAO(weights, "cpu", half=True)
    pairs = [("onnxruntime fp32 vs torch", "torch", "fp32"), ("int8 vs fp32", "fp32", "int8")]
    pairs += [("bf16 vs torch fp32", "torch", "bf16")] if "bf16" in runs else []
    files = sorted(folder.glob("*.jpg"))
    arrays = [load_image(f) for f in files]
    images = [(int(f.stem), a.shape[:2]) for f, a in zip(files, arrays)]
    poses = {k: {i: api.predict(a, imgsz=args.imgsz, settings=VAL_SETTINGS)[0] for (i, _), a in zip(images, arrays)}
             for k, api in runs.items()}
    n_gt = sum(int((p.scores >= args.gt_conf).sum()) for p in poses["fp32"].values())
    print(f"weights {weights}, imgsz {args.imgsz}, {len(files)} images, {n_gt} fp32 poses >= {args.gt_conf} as GT")
    for name, ref, other in pairs:
        m = agreement(poses[ref], poses[other], images, runs["fp32"].schema, args.gt_conf)
        print(f"{name}: OKS AP {m['AP']:.4f}  AP50 {m['AP50']:.4f}  AP75 {m['AP75']:.4f}  AR {m['AR']:.4f}")
    layout = HeadLayout(runs["fp32"].schema.num_keypoints)
    for _, ref, other in pairs[1:]:
        coords = scores = 0.0
        with torch.inference_mode():
            for a in arrays:
                x, _ = prepare_batch([a], args.imgsz)
                x = x.float() / 255.0
                d = (runs[other].backend(x) - runs[ref].backend(x)).abs()
                coords = max(coords, float(torch.cat((d[..., layout.box], d[..., layout.kpt]), -1).max()))
                scores = max(scores, float(d[..., layout.obj:layout.cls.stop].max()))
        print(f"largest raw-output difference {other} vs {ref}: coordinates {coords:.3f} px (network input), "
              f"scores {scores:.4f}")

if __name__ == "__main__":
    main()
