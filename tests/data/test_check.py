"""kapao check: each planted problem is found (and nothing else), clean data gives none, for YOLO-pose
and COCO-JSON datasets; counts, samples and the exit status."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from kapao.cfg.dataset import load_dataset_config
from kapao.cli.main import cli
from kapao.data.check import check_dataset, format_report, left_right_pairs
from kapao.data.convert import coco_to_yolo

COCO_FLIP = [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KAPAO_CACHE_DIR", str(tmp_path_factory.mktemp("label-cache")))


@pytest.fixture
def yolo_ds(coco_mini_yaml: Path, tmp_path: Path) -> Path:
    """coco-mini in the YOLO layout (train and val; images linked), via kapao convert."""
    return coco_to_yolo(load_dataset_config(coco_mini_yaml), tmp_path / "ds", splits=("train", "val")).yaml_path


def _labels(ds: Path, split: str = "train") -> list[Path]:
    return sorted((ds.parent / "labels" / split).glob("*.txt"))


def _edit_rows(ds: Path, fn: Callable[[list[str]], list[str]], splits=("train",), first_only: bool = False) -> None:
    for split in splits:
        for f in _labels(ds, split)[:1] if first_only else _labels(ds, split):
            f.write_text("".join(" ".join(fn(r.split())) + "\n" for r in f.read_text().splitlines()))


def _permute_keypoints(perm: list[int]) -> Callable[[list[str]], list[str]]:
    return lambda v: v[:5] + list(np.array(v[5:]).reshape(-1, 3)[perm].reshape(-1))


def _edit_yaml(ds: Path, **changes) -> None:
    doc = yaml.safe_load(ds.read_text())
    ds.write_text(yaml.safe_dump({**doc, **changes}, sort_keys=False))


def plant_missing_image(ds: Path) -> None:
    names = "".join(f"./images/train/{p.stem}.jpg\n" for p in _labels(ds)) + "./images/train/gone.jpg\n"
    (ds.parent / "train.txt").write_text(names)
    _edit_yaml(ds, train="train.txt")


def plant_corrupt_image(ds: Path) -> None:
    img = ds.parent / "images" / "train" / (_labels(ds)[0].stem + ".jpg")
    img.unlink()
    img.write_bytes(b"\xff\xd8not a jpeg at all" * 10)


def plant_outside(ds: Path) -> None:
    _edit_rows(ds, lambda v: [v[0], "1.6", *v[2:]], first_only=True)


def plant_row_length(ds: Path) -> None:
    _edit_rows(ds, lambda v: v[:-1], first_only=True)


def plant_class_id(ds: Path) -> None:
    _edit_rows(ds, lambda v: ["3", *v[1:]], first_only=True)


def plant_flip(ds: Path) -> None:
    _edit_yaml(ds, flip_idx=[1, 2, 0] + list(range(3, 17)))


def plant_classes(ds: Path) -> None:
    _edit_yaml(ds, names={0: "adult", 1: "child"})


def plant_swapped_knees(ds: Path) -> None:
    perm = list(range(17))
    perm[13], perm[14] = 14, 13
    _edit_rows(ds, _permute_keypoints(perm), splits=("train", "val"))


def plant_viewer_side(ds: Path) -> None:
    _edit_rows(ds, _permute_keypoints(COCO_FLIP), splits=("train", "val"))


def plant_tiny_box(ds: Path) -> None:
    f = _labels(ds)[0]
    f.write_text(f.read_text() + "0 0.5 0.5 0.004 0.004" + " 0 0 0" * 17 + "\n")


def plant_duplicate(ds: Path) -> None:
    label = _labels(ds)[0]
    img = ds.parent / "images" / "train" / (label.stem + ".jpg")
    shutil.copyfile(img.resolve(), img.with_name("copy.jpg"))
    shutil.copyfile(label, label.with_name("copy.txt"))


PLANTS = {  # plant -> (severity, text every finding contains)
    plant_missing_image: ("error", "image missing"),
    plant_corrupt_image: ("error", "image corrupt"),
    plant_outside: ("error", "outside the image"),
    plant_row_length: ("error", "values, expected 56"),
    plant_class_id: ("error", "class id 3 is out of range"),
    plant_flip: ("error", "is not an involution"),
    plant_classes: ("error", "2 classes (adult, child)"),
    plant_swapped_knees: ("warning", "left_knee / right_knee look swapped"),
    plant_viewer_side: ("warning", "viewer's side"),
    plant_tiny_box: ("warning", "too small to learn"),
    plant_duplicate: ("warning", "identical cop"),
}


@pytest.mark.parametrize("plant", list(PLANTS), ids=lambda f: f.__name__.removeprefix("plant_"))
def test_each_planted_problem_is_found(yolo_ds: Path, plant):
    plant(yolo_ds)
    severity, text = PLANTS[plant]
    report = check_dataset(yolo_ds, project=None)
    assert report.findings, f"{plant.__name__}: nothing found"
    for p in report.findings:
        assert p.severity == severity and (text in p.what or text in p.where), str(p)
    assert (len(report.errors) > 0) == (severity == "error")


def test_clean_yolo_data_has_no_problems_and_right_counts(yolo_ds: Path):
    report = check_dataset(yolo_ds, samples=2, project="runs/check")
    assert report.findings == []
    c = report.counts["val"]
    assert (c.images, c.persons, c.box_only, c.negatives, c.missing, c.corrupt, c.no_label_file) == (4, 14, 2, 0, 0, 0, 0)
    assert c.keypoints.shape == (17, 3) and c.keypoints.sum(1).tolist() == [14] * 17  # every person, every type
    assert report.save_dir == Path("runs/check/exp") and len(report.samples) == 4  # 2 per split
    assert all(p.is_file() and p.stat().st_size > 0 for p in report.samples)
    assert "0 error(s), 0 warning(s)" in format_report(report)


def test_counts_per_keypoint_and_visibility_match_the_json(coco_mini_yaml: Path, coco_mini: Path):
    report = check_dataset(coco_mini_yaml, splits=["val"], project=None)
    kp = np.array([a["keypoints"] for a in json.loads((coco_mini / "person_keypoints.json").read_text())["annotations"]])
    v = kp.reshape(len(kp), 17, 3)[..., 2]
    assert report.counts["val"].keypoints.tolist() == np.stack([(v == i).sum(0) for i in range(3)], 1).tolist()


def test_clean_coco_data_has_no_problems(coco_mini_yaml: Path):
    assert check_dataset(coco_mini_yaml, project=None).findings == []


def test_coco_problems_are_found(coco_mini: Path, tmp_path: Path):
    data = json.loads((coco_mini / "person_keypoints.json").read_text())
    data["images"][0]["file_name"] = "gone.jpg"
    a = next(a for a in data["annotations"] if a["image_id"] == data["images"][1]["id"] and a["num_keypoints"])
    k = next(i for i in range(17) if a["keypoints"][3 * i + 2] > 0)
    a["keypoints"][3 * k] = 5000.0  # far outside the image
    ann = tmp_path / "bad.json"
    ann.write_text(json.dumps(data))
    (tmp_path / "d.yaml").write_text(f"base: coco\npath: {coco_mini}\nval: images\nval_annotations: {ann}\n")
    report = check_dataset(tmp_path / "d.yaml", splits=["val"], project=None)
    assert sorted(p.what.split(";")[0] for p in report.errors) == [
        "1 labelled keypoint(s) lie far outside the image and are dropped", "image missing in split val"]


def test_left_right_pairs_from_names_and_flip():
    schema = load_dataset_config("coco").schema
    pairs, named = left_right_pairs(schema)
    assert named and pairs == [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16)]


def test_check_cli_exit_status(yolo_ds: Path):
    run = CliRunner().invoke
    res = run(cli, ["check", "--data", str(yolo_ds), "--samples", "1"])
    assert res.exit_code == 0, res.output
    assert "val: 4 images, 14 persons (2 box-only)" in res.output and "Samples saved to runs/check/exp" in res.output
    plant_row_length(yolo_ds)
    res = run(cli, ["check", "--data", str(yolo_ds), "--samples", "0"])
    assert res.exit_code == 1 and "ERROR" in res.output and "values, expected 56" in res.output
