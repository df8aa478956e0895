"""Ultralytics YOLO-pose data YAMLs as dataset configs: recognition, schema, classes, paths, errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from kapao.cfg.dataset import load_dataset_config
from kapao.cfg.yolo import class_names, dataset_root, keypoint_names, kpt_shape, yolo_schema
from kapao.cli.main import cli
from kapao.errors import ConfigError


def _write(out: Path, **doc) -> Path:
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def test_recognised_by_kpt_shape_with_schema_from_the_yaml(tmp_path: Path):
    (tmp_path / "images" / "train").mkdir(parents=True)
    path = _write(tmp_path / "pose.yaml", path=".", train="images/train", val="images/train", kpt_shape=[3, 3],
                  flip_idx=[1, 0, 2], names={0: "hand"}, kpt_names={0: ["left_tip", "right_tip", "wrist"]},
                  skeleton=[[0, 2], [1, 2]], sigmas=[0.1, 0.1, 0.2], download="https://example.invalid/x.zip")
    cfg = load_dataset_config(path)
    assert cfg.format == "yolo" and cfg.name == "pose" and cfg.root == tmp_path
    assert cfg.yolo.sources == {"train": (tmp_path / "images" / "train",), "val": (tmp_path / "images" / "train",)}
    s = cfg.schema
    assert s.names == ("left_tip", "right_tip", "wrist") and s.flip_index == (1, 0, 2)
    assert s.skeleton == ((0, 2), (1, 2)) and s.sigmas == (0.1, 0.1, 0.2) and s.num_classes == 4
    assert cfg.to_dict()["kpt_shape"] == [3, 3]


def test_defaults_generic_names_identity_flip_default_sigmas_with_warnings(tmp_path: Path):
    path = _write(tmp_path / "d.yaml", train="images", val="images", kpt_shape=[4, 2], names=["person"])
    with pytest.warns(UserWarning) as record:
        cfg = load_dataset_config(path)
    text = " ".join(str(w.message) for w in record)
    assert "no 'flip_idx'" in text and "no 'sigmas'" in text
    assert cfg.schema.names == ("kp0", "kp1", "kp2", "kp3") and cfg.schema.flip_index == (0, 1, 2, 3)
    assert cfg.schema.skeleton == () and cfg.yolo.ndim == 2 and cfg.root == tmp_path


@pytest.mark.parametrize("shape", [[17, 4], [0, 3], "17", [17]])
def test_bad_kpt_shape(shape):
    with pytest.raises(ConfigError, match="kpt_shape"):
        kpt_shape({"kpt_shape": shape}, "x.yaml")


def test_class_names_forms():
    assert class_names({"names": {0: "a", 1: "b"}}, "x") == ("a", "b")
    assert class_names({"names": {"1": "b", "0": "a"}}, "x") == ("a", "b")
    assert class_names({"names": ["a"]}, "x") == ("a",)
    assert class_names({"nc": 2}, "x") == ("class_0", "class_1")
    with pytest.raises(ConfigError, match="'names'"):
        class_names({}, "x")
    with pytest.raises(ConfigError, match="0..1"):
        class_names({"names": {0: "a", 2: "c"}}, "x")


def test_keypoint_names_list_or_per_class():
    assert keypoint_names({"kpt_names": ["a", "b"]}, 2, "x") == ("a", "b")
    assert keypoint_names({"kpt_names": {0: ["a", "b"], 1: ["a", "b"]}}, 2, "x") == ("a", "b")
    with pytest.raises(ConfigError, match="lists 1 names but kpt_shape says K=2"):
        keypoint_names({"kpt_names": ["a"]}, 2, "x")


def test_flip_idx_checked_by_the_schema():
    with pytest.raises(ConfigError, match="flip_idx"):
        yolo_schema({"kpt_shape": [3, 3], "flip_idx": [1, 2, 0], "sigmas": [0.1] * 3}, "x.yaml")
    with pytest.raises(ConfigError, match="flip_idx' has 2 entries"):
        yolo_schema({"kpt_shape": [3, 3], "flip_idx": [1, 0], "sigmas": [0.1] * 3}, "x.yaml")


def test_roboflow_relative_split_paths(tmp_path: Path):
    """Roboflow writes `train: ../train/images` next to the YAML; Ultralytics also looks for train/images."""
    (tmp_path / "train" / "images").mkdir(parents=True)
    path = _write(tmp_path / "data.yaml", train="../train/images", val="../train/images", kpt_shape=[1, 3],
                  flip_idx=[0], sigmas=[0.1], names=["x"])
    assert load_dataset_config(path).yolo.sources["train"] == (tmp_path / "train" / "images",)
    assert dataset_root({"yaml_file": str(path), "path": "/abs/root"}) == Path("/abs/root")


def test_several_classes_message_names_the_way_out(tmp_path: Path):
    path = _write(tmp_path / "zoo.yaml", train="i", val="i", kpt_shape=[1, 3], flip_idx=[0], sigmas=[0.1],
                  names={0: "cat", 1: "dog", 2: "horse"})
    with pytest.raises(ConfigError, match=r"zoo.yaml has 3 classes \(cat, dog, horse\).*--single-cls.*single_cls: true"):
        load_dataset_config(path)
    assert load_dataset_config(path, single_cls=True).yolo.classes == ("cat", "dog", "horse")


def test_malformed_yaml_is_a_usage_error_on_the_command_line(tmp_path: Path):
    path = _write(tmp_path / "bad.yaml", train="images", val="images", kpt_shape=[17, 4], names={0: "person"})
    res = CliRunner().invoke(cli, ["check", "--data", str(path)])
    assert res.exit_code == 2 and "kpt_shape" in res.output
    res = CliRunner().invoke(cli, ["convert", "--data", str(path), "--to", "coco", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "kpt_shape" in res.output


@pytest.mark.parametrize("verb", [["train", "--size", "n", "--device", "cpu"], ["val", "--device", "cpu"]])
def test_train_and_val_refuse_several_classes_as_a_usage_error(tmp_path: Path, verb: list[str]):
    path = _write(tmp_path / "zoo.yaml", train="i", val="i", kpt_shape=[1, 3], flip_idx=[0], sigmas=[0.1],
                  names={0: "cat", 1: "dog"})
    res = CliRunner().invoke(cli, [*verb, "--data", str(path), "--project", str(tmp_path / "runs")])
    assert res.exit_code == 2 and "2 classes (cat, dog)" in res.output and "--single-cls" in res.output
    assert not (tmp_path / "runs").exists()
