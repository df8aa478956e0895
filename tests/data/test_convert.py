"""kapao convert: COCO JSON <-> YOLO-pose txt; the round trip keeps every box and keypoint, and
Ultralytics' own label verifier accepts what is written."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from kapao.cfg.dataset import load_dataset_config
from kapao.cli.main import cli
from kapao.data.convert import coco_rows, coco_to_yolo, yolo_to_coco


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KAPAO_CACHE_DIR", str(tmp_path_factory.mktemp("label-cache")))


def _by_file(ann_file: Path) -> dict[str, list[tuple[list[float], list[float]]]]:
    data = json.loads(ann_file.read_text())
    names = {i["id"]: Path(i["file_name"]).name for i in data["images"]}
    out: dict[str, list] = {n: [] for n in names.values()}
    for a in sorted(data["annotations"], key=lambda a: a["id"]):
        if not a.get("iscrowd", 0):
            out[names[a["image_id"]]].append((a["bbox"], a["keypoints"]))
    return out


def test_round_trip_keeps_every_box_and_keypoint(coco_mini_yaml: Path, coco_mini: Path, tmp_path: Path):
    cfg = load_dataset_config(coco_mini_yaml)
    to_yolo = coco_to_yolo(cfg, tmp_path / "yolo", splits=("train", "val"))
    assert to_yolo.images == {"train": 4, "val": 4} and to_yolo.persons == {"train": 14, "val": 14}
    ycfg = load_dataset_config(to_yolo.yaml_path)
    assert ycfg.format == "yolo" and ycfg.schema == cfg.schema  # names, flip, sigmas, skeleton travel in the YAML
    back = yolo_to_coco(ycfg, tmp_path / "coco")
    original, again = _by_file(coco_mini / "person_keypoints.json"), _by_file(tmp_path / "coco" / "annotations" / "val.json")
    assert original.keys() == again.keys()
    for name, anns in original.items():
        assert len(again[name]) == len(anns)
        for (box0, kp0), (box1, kp1) in zip(anns, again[name]):
            np.testing.assert_allclose(box1, box0, atol=1e-2)  # pixels; 6 decimals of the image size
            k0, k1 = np.reshape(kp0, (-1, 3)), np.reshape(kp1, (-1, 3))
            np.testing.assert_array_equal(k1[:, 2], k0[:, 2])
            np.testing.assert_allclose(k1[:, :2], k0[:, :2], atol=1e-2)
    ccfg = load_dataset_config(back.yaml_path)  # a kapao COCO-format YAML reading the images where they are
    assert ccfg.format == "coco" and ccfg.schema == cfg.schema
    from kapao.data.labels import load_labels

    labels, _ = load_labels(ccfg.annotations["val"], ccfg.images["val"], 17, skip_crowd=False)
    assert labels.stats.images == 4 and labels.stats.persons == 14 and labels.stats.missing == 0


def test_ultralytics_verifier_accepts_the_labels(coco_mini_yaml: Path, tmp_path: Path):
    from ultralytics.data.utils import verify_image_label

    coco_to_yolo(load_dataset_config(coco_mini_yaml), tmp_path / "yolo", splits=("val",))
    images = sorted((tmp_path / "yolo" / "images" / "val").iterdir())
    assert len(images) == 4
    for img in images:
        label = tmp_path / "yolo" / "labels" / "val" / (img.stem + ".txt")
        _, lb, _, _, kpts, missing, found, _, corrupt, msg = verify_image_label(
            (str(img), str(label), "", True, 1, 17, 3, False))
        assert (missing, found, corrupt) == (0, 1, 0), msg
        assert kpts.shape == (len(lb), 17, 3)


def test_crowd_is_left_out_and_out_of_image_values_clipped(coco_mini: Path, tmp_path: Path):
    data = json.loads((coco_mini / "person_keypoints.json").read_text())
    data["annotations"][0]["iscrowd"] = 1
    ann = tmp_path / "crowd.json"
    ann.write_text(json.dumps(data))
    (tmp_path / "d.yaml").write_text(f"base: coco\npath: {coco_mini}\nval: images\nval_annotations: {ann}\n")
    res = coco_to_yolo(load_dataset_config(tmp_path / "d.yaml"), tmp_path / "yolo", splits=("val",))
    assert res.persons == {"val": 13} and res.skipped == {"val": 1}
    row, clipped = coco_rows({"bbox": [-10, 0, 50, 20], "keypoints": [120, 5, 2, 0, 0, 0]}, 100, 50, 2)
    assert clipped == 2  # the box's left edge and the keypoint's x
    assert [float(v) for v in row.split()] == pytest.approx([0, 0.2, 0.2, 0.4, 0.4, 1, 0.1, 2, 0, 0, 0])


def test_copy_images_copies(coco_mini_yaml: Path, tmp_path: Path):
    coco_to_yolo(load_dataset_config(coco_mini_yaml), tmp_path / "y", copy_images=True, splits=("val",))
    images = list((tmp_path / "y" / "images" / "val").iterdir())
    assert len(images) == 4 and not any(p.is_symlink() for p in images)


def test_convert_cli(coco_mini_yaml: Path, tmp_path: Path):
    run = CliRunner().invoke
    res = run(cli, ["convert", "--data", str(coco_mini_yaml), "--to", "yolo", "--out", str(tmp_path / "y")])
    assert res.exit_code == 0, res.output
    assert "val: 4 images, 14 persons" in res.output and str(tmp_path / "y" / "data.yaml") in res.output
    res = run(cli, ["convert", "--data", str(tmp_path / "y" / "data.yaml"), "--to", "yolo", "--out", str(tmp_path / "z")])
    assert res.exit_code == 2 and "already in the yolo layout" in res.output
    res = run(cli, ["convert", "--data", str(coco_mini_yaml), "--to", "yolo", "--out", str(tmp_path / "y")])
    assert res.exit_code == 2 and "not an empty folder" in res.output
    res = run(cli, ["convert", "--data", str(tmp_path / "y" / "data.yaml"), "--to", "coco", "--out", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "c" / "annotations" / "test.json").is_file()
