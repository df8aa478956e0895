"""--save-txt / --save-crop: YOLO-pose label files of the predictions that kapao and Ultralytics read back
as labels (and train on), and person crops."""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from kapao.cfg.dataset import load_dataset_config
from kapao.cli.main import cli
from kapao.data.sources import Frame
from kapao.data.yolo_labels import load_yolo_labels, read_label_file, row_annotations
from kapao.infer.label_sinks import CropSink, LabelSink
from kapao.poses import VISIBLE_CONF, Poses
from kapao.weights.checkpoint import save_checkpoint
from tests.infer.test_predictor import eager_model


def _poses() -> Poses:
    boxes = torch.tensor([[10.0, 20.0, 110.0, 180.0], [-5.0, 30.0, 60.0, 250.0]])  # the second leaves the image
    kp = torch.zeros(2, 3, 3)
    kp[..., 0], kp[..., 1] = torch.tensor([[20.0, 40.0, 60.0]] * 2), torch.tensor([[30.0, 50.0, 170.0]] * 2)
    kp[..., 2] = torch.tensor([[0.9, VISIBLE_CONF, 0.49], [0.1, 0.6, 0.7]])
    return Poses(boxes, torch.tensor([0.8, 0.6]), kp, orig_shape=(200, 120))


def test_rows_read_back_as_labels(tmp_path: Path):
    p = _poses()
    rows = p.to_yolo()
    assert len(rows) == 2 and all(len(r.split()) == 5 + 3 * 3 for r in rows)
    f = tmp_path / "a.txt"
    f.write_text("".join(r + "\n" for r in rows))
    back = read_label_file(f, 3, 3, 1)
    assert not back.problems and back.outside == 0
    ann = row_annotations(back, (200, 120))
    assert ann[0]["bbox"] == pytest.approx([10, 20, 100, 160], abs=1e-3)
    assert ann[1]["bbox"] == pytest.approx([0, 30, 60, 170], abs=1e-3)  # clipped into the image
    kp = np.array(ann[0]["keypoints"]).reshape(3, 3)
    assert kp[:2, :2].ravel().tolist() == pytest.approx([20, 30, 40, 50], abs=1e-3)
    assert kp[:, 2].tolist() == [2, 2, 0]  # confidence >= VISIBLE_CONF: labelled; below: the (0, 0, 0) placeholder
    assert np.array(ann[1]["keypoints"]).reshape(3, 3)[:, 2].tolist() == [0, 2, 2]
    assert [r.split()[-1] for r in p.to_yolo(save_conf=True)] == ["0.80000", "0.60000"]
    assert p.to_yolo(visible_conf=0.0)[0].split()[-1] == "2"


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("w") / "eager.pt"
    save_checkpoint(path, eager_model(), extra={"epoch": 0})
    return path


def _predict_labels(weights: Path, images: Path, project: Path, *extra: str) -> Path:
    res = CliRunner().invoke(cli, ["predict", str(images), "--weights", str(weights), "--imgsz", "128", "--device", "cpu",
                                   "--backend", "torch", "--max-det", "3", "--nosave", "--project", str(project), *extra])
    assert res.exit_code == 0, res.output
    return project / "exp"


def test_save_txt_and_crop_cli(weights: Path, coco_mini: Path, tmp_path: Path):
    run = _predict_labels(weights, coco_mini / "images", tmp_path, "--save-txt", "--save-crop", "--save-conf")
    images = sorted((coco_mini / "images").glob("*.jpg"))
    assert sorted(p.name for p in (run / "labels").iterdir()) == sorted(p.with_suffix(".txt").name for p in images)
    rows = (run / "labels" / images[0].with_suffix(".txt").name).read_text().splitlines()
    assert len(rows) == 3 and all(len(r.split()) == 5 + 17 * 3 + 1 for r in rows)  # --save-conf: one more column
    res = CliRunner().invoke(cli, ["predict", str(images[0]), "--weights", str(weights), "--save-conf"])
    assert res.exit_code == 2 and "--save-conf adds scores to the --save-txt label rows" in res.output


def test_crops_are_the_boxes_of_the_original_image(coco_mini: Path, tmp_path: Path):
    image = sorted((coco_mini / "images").glob("*.jpg"))[0]
    img = cv2.imread(str(image))
    h, w = img.shape[:2]
    boxes = torch.tensor([[10.2, 20.7, 110.0, 180.5], [w - 30.0, h - 40.0, w + 50.0, h + 9.0], [5.0, 5.0, 5.0, 90.0]])
    poses = Poses(boxes, torch.ones(3), torch.zeros(3, 17, 3), orig_shape=(h, w))
    sink = CropSink(coco_mini / "images")
    sink.open(tmp_path)
    sink.add(Frame(img, str(image)), poses)
    crops = sorted((tmp_path / "crops" / "person").iterdir())
    assert [c.name for c in crops] == [f"{image.stem}_0.jpg", f"{image.stem}_1.jpg"]  # no-area box: no file
    assert cv2.imread(str(crops[0])).shape[:2] == (181 - 20, 110 - 10)
    assert cv2.imread(str(crops[1])).shape[:2] == (40, 30)  # clipped to the image
    sink.add(Frame(img, "clip.mp4", frame=7), poses)
    assert (tmp_path / "crops" / "person" / "clip_7_0.jpg").is_file()


def _gt_labels(coco_mini: Path, run: Path) -> int:
    """coco-mini's ground truth as Poses written by LabelSink into `run`/labels (what --save-txt writes for
    perfect predictions, v = 2 -> confidence 1); the number of persons written."""
    import json

    data = json.loads((coco_mini / "person_keypoints.json").read_text())
    sink, n = LabelSink(coco_mini / "images"), 0
    sink.open(run)
    for info in data["images"]:
        anns = [a for a in data["annotations"] if a["image_id"] == info["id"] and not a.get("iscrowd")]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float32).reshape(-1, 4)
        kp = torch.tensor([a["keypoints"] for a in anns], dtype=torch.float32).reshape(-1, 17, 3)
        kp[..., 2] = (kp[..., 2] > 0).float()
        img = cv2.imread(str(coco_mini / "images" / info["file_name"]))
        sink.add(Frame(img, str(coco_mini / "images" / info["file_name"])), Poses(boxes, torch.ones(len(anns)), kp))
        n += len(anns)
    return n


def _pseudo_labelled_dataset(run: Path, coco_mini: Path, root: Path) -> Path:
    """A YOLO-pose dataset of coco-mini's images (linked) with the predicted labels."""
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for img in sorted((coco_mini / "images").glob("*.jpg")):
            os.symlink(img, root / "images" / split / img.name)
            (root / "labels" / split / img.with_suffix(".txt").name).write_bytes(
                (run / "labels" / img.with_suffix(".txt").name).read_bytes())
    schema = load_dataset_config("coco").schema
    doc = {"path": str(root), "train": "images/train", "val": "images/val", "kpt_shape": [17, 3],
           "flip_idx": list(schema.flip_index), "names": {0: "person"}, "kpt_names": {0: list(schema.names)},
           "sigmas": list(schema.sigmas)}
    (root / "data.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return root / "data.yaml"


@pytest.mark.slow
def test_pseudo_labels_round_trip_train_and_val(weights: Path, coco_mini: Path, tmp_path: Path):
    """Predictions saved with --save-txt are labels: kapao's reader and Ultralytics' checker accept every
    row, and a tiny model trains on them for one epoch and validates."""
    from ultralytics.data.utils import verify_image_label

    run = tmp_path / "pred"
    persons = _gt_labels(coco_mini, run)
    data = _pseudo_labelled_dataset(run, coco_mini, tmp_path / "ds")
    labels = load_yolo_labels(load_dataset_config(data), "train")
    assert len(labels.boxes) == persons == 14  # every written pose reads back as a label
    from kapao.data.labels import load_labels

    ref, _ = load_labels(coco_mini / "person_keypoints.json", coco_mini / "images", 17, skip_crowd=True)
    order = {Path(str(f)).name: i for i, f in enumerate(ref.files)}
    for i, f in enumerate(labels.files):
        j = order[Path(str(f)).name]
        a, b = labels.keypoints[labels.offsets[i]:labels.offsets[i + 1]], ref.keypoints[ref.offsets[j]:ref.offsets[j + 1]]
        assert np.abs(a[..., :2] - b[..., :2]).max() < 1e-3 * max(ref.shapes[j])  # 6 decimals of the image size
        assert ((a[..., 2] > 0) == (b[..., 2] > 0)).all()
    for img in sorted((tmp_path / "ds" / "images" / "train").iterdir()):
        lb = tmp_path / "ds" / "labels" / "train" / img.with_suffix(".txt").name
        out = verify_image_label((str(img), str(lb), "", True, 1, 17, 3, False))
        assert out[0] is not None and out[8] == 0, out[-1]  # Ultralytics: not corrupt
    res = CliRunner().invoke(cli, ["train", "--data", str(data), "--size", "n", "--imgsz", "128", "--epochs", "1",
                                   "--batch", "2", "--workers", "0", "--device", "cpu", "--no-plots",
                                   "--project", str(tmp_path / "train"), "--hyp-set", "warmup_min_iters=2",
                                   "--hyp-set", "nominal_batch=2"])
    assert res.exit_code == 0, res.output
    best = tmp_path / "train" / "exp" / "weights" / "last.pt"
    res = CliRunner().invoke(cli, ["val", "--data", str(data), "--weights", str(best), "--imgsz", "128", "--batch", "2",
                                   "--workers", "0", "--device", "cpu", "--backend", "torch",
                                   "--project", str(tmp_path / "val")])
    assert res.exit_code == 0, res.output
    assert "AP" in res.output
