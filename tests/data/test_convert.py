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


def _planted(coco_mini: Path, tmp_path: Path, names: dict[int, str]) -> Path:
    """A copy of coco-mini under tmp/ds whose image entries `names` (index -> file_name) are rewritten."""
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(coco_mini / "images", ds / "images")
    gt = json.loads((coco_mini / "person_keypoints.json").read_text())
    for i, name in names.items():
        gt["images"][i]["file_name"] = name
    (ds / "a.json").write_text(json.dumps(gt))
    (ds / "d.yaml").write_text("base: coco\npath: .\n" + "".join(f"{s}: images\n{s}_annotations: a.json\n"
                                                                for s in ("train", "val")))
    return ds / "d.yaml"


def _listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize("name", ["../../../x/y.jpg", "/etc/hostname", "../ds/images/../../escape.jpg", "a\x00b.jpg",
                                  "images/../../../../tmp/x.jpg", "sub/../../outside.jpg"])
@pytest.mark.parametrize("copy", [False, True])
def test_convert_never_writes_outside_out(coco_mini: Path, tmp_path: Path, name: str, copy: bool):
    """A hostile file_name is refused with one line naming the JSON and the entry; --out is removed again and
    nothing beside it appears."""
    yaml_path = _planted(coco_mini, tmp_path, {1: name})
    before = _listing(tmp_path)
    argv = ["convert", "--data", str(yaml_path), "--to", "yolo", "--out", str(tmp_path / "ds" / "out" / "x")]
    res = CliRunner().invoke(cli, argv + (["--copy-images"] if copy else []))
    assert res.exit_code == 1, res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("Error: ") and "a.json: image id" in last and "bug" not in last, last
    assert ("NUL" in last) if "\x00" in name else ("leads outside" in last)
    assert _listing(tmp_path) - before <= {"ds/out"}  # only the parent of --out (it was asked for)


@pytest.mark.parametrize("copy", [False, True])
def test_convert_refuses_two_entries_naming_one_file(coco_mini: Path, tmp_path: Path, copy: bool):
    """Two entries with one file_name would write the second through the first's link onto the source image."""
    yaml_path = _planted(coco_mini, tmp_path, {})
    gt = json.loads((yaml_path.parent / "a.json").read_text())
    gt["images"][1]["file_name"] = gt["images"][0]["file_name"]
    (yaml_path.parent / "a.json").write_text(json.dumps(gt))
    source = (yaml_path.parent / "images" / gt["images"][0]["file_name"]).read_bytes()
    argv = ["convert", "--data", str(yaml_path), "--to", "yolo", "--out", str(tmp_path / "out")]
    res = CliRunner().invoke(cli, argv + (["--copy-images"] if copy else []))
    assert res.exit_code == 1 and "is written twice" in res.output.strip().splitlines()[-1], res.output
    assert (yaml_path.parent / "images" / gt["images"][0]["file_name"]).read_bytes() == source
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["../../../etc/passwd", "/etc/hostname", "a\x00b.jpg"])
def test_check_reports_and_val_skips_entries_outside_the_image_folder(coco_mini: Path, tmp_path: Path, name: str):
    from kapao.data.labels import parse_annotations

    yaml_path = _planted(coco_mini, tmp_path, {0: name})
    res = CliRunner().invoke(cli, ["check", "--data", str(yaml_path), "--samples", "0", "--project", str(tmp_path / "r")])
    assert res.exit_code == 1 and "1 image entr(ies) lead outside the image folder" in res.output, res.output
    labels = parse_annotations(yaml_path.parent / "a.json", yaml_path.parent / "images", 17, False)
    assert labels.stats.outside == 1 and labels.stats.images == 3 and name not in labels.files.tolist()
    assert "1 image entries leading outside the image folder skipped" in labels.stats.summary()


def test_yolo_list_lines_outside_the_root_are_skipped_and_counted(coco_mini_yaml: Path, tmp_path: Path):
    from kapao.data.check import check_dataset
    from kapao.data.yolo_labels import split_files

    res = coco_to_yolo(load_dataset_config(coco_mini_yaml), tmp_path / "yolo", splits=("train", "val"))
    ds = res.yaml_path.parent
    images = sorted(p.name for p in (ds / "images" / "val").iterdir())
    (tmp_path / "outside.jpg").write_bytes((ds / "images" / "val" / images[0]).read_bytes())
    (ds / "val.txt").write_text(f"./images/val/{images[0]}\n../outside.jpg\n/etc/hostname.jpg\nimages/val/{images[1]}\n")
    (ds / "data.yaml").write_text((ds / "data.yaml").read_text().replace("val: images/val", "val: val.txt"))
    cfg = load_dataset_config(ds / "data.yaml")
    files = split_files(cfg, "val")
    assert [p.name for p in files.images] == images[:2] and files.outside == [f"{ds / 'val.txt'}:2", f"{ds / 'val.txt'}:3"]
    report = check_dataset(ds / "data.yaml", splits=["val"], samples=0, project=tmp_path / "r")
    assert any("2 image entr(ies) lead outside" in str(p) for p in report.errors), report.problems
