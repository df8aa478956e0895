"""Ultralytics YOLO-pose datasets: txt labels (K = 5, 14, 17, 21; with and without visibility; image
lists), the label cache, several classes, evaluation against the in-memory ground truth, val and train.

The fixtures are coco-mini written in the YOLO layout by a small writer of this file (independent of
kapao.data.convert), so every parsed label can be compared with the COCO JSON it came from.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

import kapao.data.yolo_labels as yf
from kapao.cfg.dataset import load_dataset_config
from kapao.cfg.schema import BOX_AREA_FACTOR
from kapao.cli.main import cli
from kapao.data.dataset import PoseDataset
from kapao.data.labels import read_coco
from kapao.errors import ConfigError, DataError
from kapao.eval.metrics import evaluate

COCO_FLIP = [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]
MIDPOINTS = [(5, 6), (11, 12), (13, 14), (15, 16)]  # K = 21: COCO + 4 self-symmetric midpoints
SUBSETS = {5: list(range(5)), 14: list(range(3, 17)), 17: list(range(17)), 21: list(range(17))}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KAPAO_CACHE_DIR", str(tmp_path_factory.mktemp("label-cache")))


def coco_keypoints(ann: dict, k: int) -> np.ndarray:
    """The (K, 3) pixel keypoints of a coco-mini person for the K-keypoint variant."""
    kp = np.array(ann["keypoints"], np.float64).reshape(17, 3)
    if k != 21:
        return kp[SUBSETS[k]]
    extra = np.zeros((4, 3))
    for i, (a, b) in enumerate(MIDPOINTS):
        if kp[a, 2] > 0 and kp[b, 2] > 0:
            extra[i] = [(kp[a, 0] + kp[b, 0]) / 2, (kp[a, 1] + kp[b, 1]) / 2, 2]
    return np.concatenate([kp, extra])


def variant_schema(k: int, names: list[str]) -> tuple[list[str], list[int]]:
    """(kpt_names, flip_idx) of the K-keypoint variant of COCO."""
    if k == 21:
        return names + [f"mid_{names[a].split('_', 1)[1]}" for a, _ in MIDPOINTS], COCO_FLIP + [17, 18, 19, 20]
    idx = SUBSETS[k]
    return [names[i] for i in idx], [idx.index(COCO_FLIP[i]) for i in idx]


def write_yolo(root: Path, coco_mini: Path, k: int = 17, ndim: int = 3, image_list: bool = False,
               classes: dict[int, str] | None = None, class_of=lambda n: 0) -> Path:
    """coco-mini as a YOLO-pose dataset under root (images linked into images/train and images/val);
    returns the data YAML. class_of(n) gives the class id of the n-th person."""
    data = json.loads((coco_mini / "person_keypoints.json").read_text())
    anns: dict[int, list] = {}
    for a in data["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    n = 0
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for info in data["images"]:
            (root / "images" / split / info["file_name"]).symlink_to(coco_mini / "images" / info["file_name"])
            w, h = info["width"], info["height"]
            rows = []
            for a in anns.get(info["id"], []):
                x, y, bw, bh = a["bbox"]
                kp = coco_keypoints(a, k)
                vals = [(x + bw / 2) / w, (y + bh / 2) / h, bw / w, bh / h]
                for px, py, v in kp:
                    vals += [px / w, py / h] + ([v] if ndim == 3 else [])
                rows.append(f"{class_of(n)} " + " ".join(f"{v:.6f}" for v in vals))
                n += 1
            (root / "labels" / split / info["file_name"]).with_suffix(".txt").write_text("\n".join(rows) + "\n")
    names, flip = variant_schema(k, data["categories"][0]["keypoints"])
    train: str = "images/train"
    if image_list:
        (root / "train.txt").write_text("".join(f"./images/train/{i['file_name']}\n" for i in data["images"]))
        train = "train.txt"
    doc = {"path": ".", "train": train, "val": "images/val", "kpt_shape": [k, ndim], "flip_idx": flip,
           "names": classes or {0: "person"}, "kpt_names": {0: names}}
    path = root / "data.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def expected(coco_mini: Path, k: int, ndim: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """file name -> (boxes (P, 4) xyxy, keypoints (P, K, 3)) as the YOLO labels should parse."""
    data = json.loads((coco_mini / "person_keypoints.json").read_text())
    out = {}
    for info in data["images"]:
        anns = [a for a in data["annotations"] if a["image_id"] == info["id"]]
        boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                          for a in anns]).reshape(-1, 4)
        kps = np.array([coco_keypoints(a, k) for a in anns]).reshape(-1, k, 3)
        kps[kps[..., 2] <= 0] = 0
        if ndim == 2:
            kps[..., 2] = np.where(kps[..., 2] > 0, 2, 0)
        out[info["file_name"]] = (boxes, kps)
    return out


# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [5, 14, 17, 21])
@pytest.mark.parametrize("ndim", [2, 3])
def test_labels_equal_the_coco_json(coco_mini: Path, tmp_path: Path, k: int, ndim: int):
    cfg = load_dataset_config(write_yolo(tmp_path / "ds", coco_mini, k, ndim))
    names, flip = variant_schema(k, json.loads((coco_mini / "person_keypoints.json").read_text())["categories"][0]["keypoints"])
    assert cfg.format == "yolo" and cfg.yolo.ndim == ndim and cfg.yolo.classes == ("person",)
    assert list(cfg.schema.names) == names and list(cfg.schema.flip_index) == flip
    labels = yf.load_yolo_labels(cfg, "val")
    want = expected(coco_mini, k, ndim)
    assert labels.stats.images == 4 and labels.stats.persons == 14 and labels.stats.negatives == 0
    assert labels.stats.box_only == sum(int((kp[..., 2] == 0).all(1).sum()) for _, kp in want.values())
    for i, f in enumerate(labels.files):
        boxes, kps = want[Path(str(f)).name]
        a, b = labels.offsets[i], labels.offsets[i + 1]
        np.testing.assert_allclose(labels.boxes[a:b], boxes, atol=2e-3)  # 6 decimals of the image size
        np.testing.assert_array_equal(labels.keypoints[a:b, :, 2], kps[..., 2])
        np.testing.assert_allclose(labels.keypoints[a:b, :, :2], kps[..., :2], atol=2e-3)


def test_image_list_and_label_path_rule(coco_mini: Path, tmp_path: Path):
    yaml_path = write_yolo(tmp_path / "ds", coco_mini, image_list=True)
    cfg = load_dataset_config(yaml_path)
    assert cfg.yolo.sources["train"] == (tmp_path / "ds" / "train.txt",)
    files = yf.split_files(cfg, "train")
    assert [p.name for p in files.images] == sorted(p.name for p in (coco_mini / "images").iterdir())
    assert all(lab == tmp_path / "ds" / "labels" / "train" / (img.stem + ".txt")
               for img, lab in zip(files.images, files.labels))
    ds = PoseDataset(cfg, "train", 128)
    assert len(ds) == 4 and ds.stats.persons == 14
    assert all(Path(p).is_file() for p in ds.files)


def test_negatives_kept_and_box_only_rows(coco_mini: Path, tmp_path: Path):
    yaml_path = write_yolo(tmp_path / "ds", coco_mini, k=5, ndim=2)
    labels_dir = tmp_path / "ds" / "labels" / "val"
    first, second, third = sorted(labels_dir.iterdir())[:3]
    first.write_text("")  # empty label file: a negative
    second.unlink()  # no label file: a negative too
    third.write_text("0 0.5 0.5 0.2 0.4" + " 0 0" * 5 + "\n")  # all keypoints 0: a box-only person
    labels = yf.load_yolo_labels(load_dataset_config(yaml_path), "val")
    assert labels.stats.images == 4 and labels.stats.negatives == 2
    i = [Path(str(f)).stem for f in labels.files].index(third.stem)
    assert labels.offsets[i + 1] - labels.offsets[i] == 1
    assert (labels.keypoints[labels.offsets[i]] == 0).all()


def test_two_value_keypoints_outside_or_at_origin_are_unlabelled(tmp_path: Path):
    rows = yf.LabelRows(np.zeros(1, np.int64), np.array([[0.5, 0.5, 0.5, 0.5]], np.float32),
                        np.array([[[0.25, 0.5], [0, 0], [1.5, 0.5], [-0.1, 0.2]]], np.float32))
    (ann,) = yf.row_annotations(rows, (100, 200))
    assert ann["bbox"] == pytest.approx([50, 25, 100, 50])
    assert ann["keypoints"] == pytest.approx([50, 50, 2, 0, 0, 0, 300, 50, 0, -20, 20, 0])


def test_label_cache_is_used_and_invalidated(coco_mini: Path, tmp_path: Path, monkeypatch):
    cfg = load_dataset_config(write_yolo(tmp_path / "ds", coco_mini))
    first = yf.load_yolo_labels(cfg, "val")
    calls = []
    real = yf.parse_split
    monkeypatch.setattr(yf, "parse_split", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = yf.load_yolo_labels(cfg, "val")
    assert calls == [] and np.array_equal(again.boxes, first.boxes)
    label = sorted((tmp_path / "ds" / "labels" / "val").iterdir())[0]
    label.write_text("")
    os.utime(label, ns=(1, 1))
    changed = yf.load_yolo_labels(cfg, "val")
    assert calls == [1] and changed.stats.persons < first.stats.persons


def test_bad_row_is_one_clear_error(coco_mini: Path, tmp_path: Path):
    cfg = load_dataset_config(write_yolo(tmp_path / "ds", coco_mini, k=5, ndim=3))
    label = sorted((tmp_path / "ds" / "labels" / "val").iterdir())[0]
    label.write_text("0 0.5 0.5 0.2 0.2 0.1 0.1\n")
    with pytest.raises(DataError, match=rf"{label.name}:1: 7 values, expected 20 .*kapao check"):
        yf.load_yolo_labels(cfg, "val")


# ----------------------------------------------------------------------------------------------
def test_several_classes_refused_unless_single_cls(coco_mini: Path, tmp_path: Path):
    yaml_path = write_yolo(tmp_path / "ds", coco_mini, classes={0: "adult", 1: "child"}, class_of=lambda n: n % 2)
    with pytest.raises(ConfigError, match=r"2 classes \(adult, child\).*--single-cls"):
        load_dataset_config(yaml_path)
    cfg = load_dataset_config(yaml_path, single_cls=True)
    assert cfg.yolo.single_cls and cfg.schema.num_classes == 1 + 17  # today's head layout: 1 pose class + K
    assert yf.load_yolo_labels(cfg, "val").stats.persons == 14
    doc = yaml.safe_load(yaml_path.read_text())
    yaml_path.write_text(yaml.safe_dump({**doc, "single_cls": True}))
    assert load_dataset_config(yaml_path).yolo.single_cls


# ----------------------------------------------------------------------------------------------
def _coco_gt_with_box_area(coco_mini: Path, tmp_path: Path) -> Path:
    data = json.loads((coco_mini / "person_keypoints.json").read_text())
    for a in data["annotations"]:
        a["area"] = a["bbox"][2] * a["bbox"][3] * BOX_AREA_FACTOR
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    return path


def _predictions(coco, jitter: float, seed: int = 0) -> list[dict]:
    """One prediction per GT person with keypoints: its keypoints shifted by N(0, jitter) pixels."""
    rng = np.random.default_rng(seed)
    out = []
    for a in sorted(coco.dataset["annotations"], key=lambda a: a["id"]):
        kp = np.array(a["keypoints"], np.float64).reshape(-1, 3)
        if not (kp[:, 2] > 0).any():
            continue
        kp[:, :2] += rng.normal(0, jitter, kp[:, :2].shape)
        kp[:, 2] = 1
        out.append({"image_id": a["image_id"], "category_id": 1, "keypoints": kp.reshape(-1).tolist(),
                    "score": float(rng.uniform(0.1, 1)), "file": coco.imgs[a["image_id"]]["file_name"]})
    return out


@pytest.mark.parametrize("jitter", [0.0, 4.0, 12.0])
def test_ap_of_yolo_copy_equals_ap_of_coco_json(coco_mini: Path, tmp_path: Path, jitter: float):
    """Same predictions (GT as prediction, then jittered), scored against the COCO JSON (area 0.53 x box)
    and against the YOLO copy's in-memory ground truth: identical metrics."""
    coco_gt = read_coco(_coco_gt_with_box_area(coco_mini, tmp_path))
    cfg = load_dataset_config(write_yolo(tmp_path / "ds", coco_mini))
    yolo_gt = PoseDataset(cfg, "val", 128).coco
    id_of = {Path(i["file_name"]).name: i["id"] for i in yolo_gt.dataset["images"]}
    preds = _predictions(coco_gt, jitter)
    moved = [{**p, "image_id": id_of[p["file"]]} for p in preds]
    a = evaluate(coco_gt, preds, cfg.schema)
    b = evaluate(yolo_gt, moved, cfg.schema)
    assert a == pytest.approx(b, abs=1e-9)
    if jitter == 0:
        assert a["AP"] == pytest.approx(1.0)
    else:
        assert 0 < a["AP"] < 1


def test_val_cli_on_yolo_data(coco_mini: Path, tmp_path: Path):
    from kapao.models.network import build_model
    from kapao.weights.checkpoint import save_checkpoint

    yaml_path = write_yolo(tmp_path / "ds", coco_mini, k=5, ndim=2)
    weights = tmp_path / "n5.pt"
    save_checkpoint(weights, build_model("n", load_dataset_config(yaml_path).schema), extra={"epoch": 0})
    res = CliRunner().invoke(cli, ["val", "--weights", str(weights), "--data", str(yaml_path), "--imgsz", "128",
                                   "--workers", "0", "--device", "cpu", "--project", str(tmp_path / "runs")])
    assert res.exit_code == 0, res.output
    assert "data val (coco protocol): 4 images" in res.output
    assert "Average Precision  (AP)" in res.output and f"OKS area = {BOX_AREA_FACTOR} x box area" in res.output


@pytest.mark.slow
def test_train_two_epochs_on_yolo_data(coco_mini: Path, tmp_path: Path):
    from kapao.train.run import TrainArgs
    from kapao.train.trainer import train
    from kapao.weights.loader import load_model

    yaml_path = write_yolo(tmp_path / "ds", coco_mini, k=14, ndim=2, image_list=True,  # two classes, merged
                           classes={0: "adult", 1: "child"}, class_of=lambda n: n % 2)
    doc = yaml.safe_load(yaml_path.read_text())  # a skeleton and sigmas in the YAML travel into the weights (predict draws it)
    yaml_path.write_text(yaml.safe_dump({**doc, "skeleton": [[0, 1], [2, 3], [8, 10]], "sigmas": [0.07] * 14}))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = train(TrainArgs(data=str(yaml_path), size="n", imgsz=128, epochs=2, batch=2, workers=0, device="cpu",
                              project=str(tmp_path / "runs"), hyp_overrides={"warmup_min_iters": 2, "nominal_batch": 2},
                              single_cls=True))
    finally:
        torch.set_num_threads(threads)
    with open(run / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(np.isfinite(float(v)) for r in rows for k, v in r.items() if "loss" in k)
    model, _ = load_model(run / "weights" / "best.pt")
    schema = load_dataset_config(yaml_path, single_cls=True).schema
    assert schema.skeleton == ((0, 1), (2, 3), (8, 10)) and schema.sigmas == (0.07,) * 14
    assert model.schema == schema  # names, flip order, sigmas and skeleton of the YAML
