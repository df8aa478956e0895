"""Dataset/hyp configs, keypoint schema validation, layouts and inference settings."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from kapao.cfg.dataset import load_dataset_config, resolve_schema
from kapao.cfg.schema import DEFAULT_SIGMA, HeadLayout, KeypointSchema, TargetLayout
from kapao.cfg.settings import PREDICT_SETTINGS, VAL_SETTINGS, InferenceSettings, load_hyp
from kapao.errors import ConfigError, DataError

CROWDPOSE_SIGMAS = [.79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89, .79, .79]


def test_builtin_coco():
    cfg = load_dataset_config("coco")
    s = cfg.schema
    assert s.num_keypoints == 17 and s.num_classes == 18
    assert s.names[0] == "nose" and s.names[-1] == "right_ankle"
    assert s.sigmas[0] == pytest.approx(0.026) and s.sigmas[-1] == pytest.approx(0.089)
    # every left keypoint maps to its right twin
    for k, name in enumerate(s.names):
        twin = s.names[s.flip_index[k]]
        assert twin == name.replace("left", "right") if "left" in name else twin == name.replace("right", "left")
    assert s.kp_bbox == 0.05
    assert set(cfg.images) == {"train", "val"}


def test_builtin_crowdpose():
    s = load_dataset_config("crowdpose").schema
    assert s.names == ("left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist",
                       "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle",
                       "right_ankle", "head", "neck")
    assert list(s.sigmas) == pytest.approx([v / 10 for v in CROWDPOSE_SIGMAS])
    assert s.flip_index[12] == 12 and s.flip_index[13] == 13


def test_layouts_follow_k():
    assert HeadLayout(17).num_outputs == 57 and HeadLayout(14).num_outputs == 48
    lay = HeadLayout(21)
    assert lay.cls == slice(5, 27) and lay.kpt == slice(27, 69) and lay.num_outputs == 69
    assert TargetLayout(21).width == 6 + 63 and TargetLayout(21).kpt == slice(6, 69)


def test_base_inheritance_and_relative_path(tmp_path: Path):
    y = tmp_path / "mine.yaml"
    y.write_text("base: coco\npath: ds\nval: imgs\nval_annotations: ann.json\n")
    cfg = load_dataset_config(y)
    assert cfg.root == tmp_path / "ds"
    assert cfg.split("val") == (tmp_path / "ds" / "imgs", tmp_path / "ds" / "ann.json")
    assert cfg.schema == load_dataset_config("coco").schema
    assert cfg.name == "mine"


def test_custom_k21(tmp_path: Path):
    names = [f"p{i}" for i in range(21)]
    flip = list(range(21))
    flip[1], flip[2] = 2, 1
    y = tmp_path / "hand.yaml"
    y.write_text(f"path: .\ntrain: i\ntrain_annotations: a.json\nkpt_names: {names}\nflip_idx: {flip}\n"
                 f"sigmas: {[0.03] * 21}\nskeleton: [[0, 1], [1, 2]]\n")
    s = load_dataset_config(y).schema
    assert s.num_keypoints == 21 and s.num_classes == 22 and s.flip_index[1] == 2


def test_missing_sigmas_warns(tmp_path: Path):
    y = tmp_path / "nosig.yaml"
    y.write_text("path: .\nkpt_names: [a, b]\nflip_idx: [1, 0]\n")
    with pytest.warns(UserWarning, match="sigmas"):
        s = load_dataset_config(y).schema
    assert s.sigmas == (0.05, 0.05)


@pytest.mark.parametrize("body, match", [
    ("path: .\nkpt_names: [a, b]\nflip_idx: [0, 0]\nsigmas: [.1, .1]\n", "permutation"),
    ("path: .\nkpt_names: [a, b, c]\nflip_idx: [1, 2, 0]\nsigmas: [.1, .1, .1]\n", "swap pairs"),
    ("path: .\nkpt_names: [a, b]\nflip_idx: [0, 1]\nsigmas: [.1]\n", "sigmas"),
    ("path: .\nkpt_names: [a, b]\nflip_idx: [0, 1]\nsigmas: [.1, .1]\nskeleton: [[0, 5]]\n", "skeleton"),
    ("path: .\nkpt_names: [a]\nflip_idx: [0]\nsigmas: [.1]\nnc: 2\n", "unknown key"),
    ("base: nowhere.yaml\n", "neither a built-in"),
    ("path: .\nflip_idx: [0]\n", "kpt_names"),
    (": : :\n", "not valid YAML"),
    ("path: .\nkpt_names: [a, b]\nflip_idx: [1, 0]\nsigmas: [x, .1]\n", "'sigmas' must be a list of numbers"),
    ("path: .\nkpt_names: [a, b]\nflip_idx: [1, 0]\nsigmas: [.nan, .1]\n", "'sigmas' must be finite"),
    ("path: .\nkpt_names: [a, b]\nflip_idx: 1\nsigmas: [.1, .1]\n", "'flip_idx' must be a list of integers"),
    ("path: .\nkpt_names: [a, b]\nflip_idx: [1.5, 0]\nsigmas: [.1, .1]\n", "'flip_idx' must be a list of integers"),
    ("path: .\nkpt_names: a\nflip_idx: [0]\nsigmas: [.1]\n", "'kpt_names' must be a list"),
    ("path: .\nkpt_names: [a]\nflip_idx: [0]\nsigmas: [.1]\nskeleton: 3\n", "'skeleton' must be a list"),
    ("path: .\nkpt_names: [a]\nflip_idx: [0]\nsigmas: [.1]\nkp_bbox: big\n", "'kp_bbox' must be a number"),
])
def test_bad_dataset_yaml(tmp_path: Path, body: str, match: str):
    y = tmp_path / "bad.yaml"
    y.write_text(body)
    with pytest.raises(ConfigError, match=match):
        load_dataset_config(y)


def test_unreadable_config_files_are_config_errors(tmp_path: Path):
    """A folder, a binary file or a list where a YAML mapping is expected: a ConfigError naming the path."""
    (tmp_path / "dir.yaml").mkdir()
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00\x81 binary")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="neither a built-in name"):
        load_dataset_config(tmp_path / "dir.yaml")
    with pytest.raises(ConfigError, match="bin.yaml: not a text \\(YAML\\) file"):
        load_dataset_config(tmp_path / "bin.yaml")
    with pytest.raises(ConfigError, match="list.yaml: expected a mapping"):
        load_hyp(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="hyperparameter file not found"):
        load_hyp(tmp_path / "dir.yaml")


@pytest.mark.parametrize("body, match", [
    ("lr0: fast\n", "hyperparameter 'lr0' must be a number, got 'fast'"),
    ("lr0: .nan\n", "'lr0' must be a finite non-negative number"),
    ("lr0: .inf\n", "'lr0' must be a finite non-negative number"),
    ("lr0: [1]\n", "'lr0' must be a number"),
    ("lr00: 1\n", "unknown hyperparameter\\(s\\) lr00; known: lr0, lrf"),
])
def test_bad_hyp_values(tmp_path: Path, body: str, match: str):
    y = tmp_path / "h.yaml"
    y.write_text(body)
    with pytest.raises(ConfigError, match=match):
        load_hyp(y)


def test_unknown_dataset_name():
    with pytest.raises(ConfigError, match="coco, crowdpose"):
        load_dataset_config("cocoo")


def test_missing_split_names_available(tmp_path: Path):
    with pytest.raises(ConfigError, match="no 'test' split; it has: train, val"):
        load_dataset_config("coco").split("test")


def test_hyp_defaults_and_override(tmp_path: Path):
    h = load_hyp()
    assert (h.lr0, h.lrf, h.momentum, h.box, h.obj, h.cls, h.kp) == (0.01, 0.2, 0.937, 0.05, 0.7, 0.3, 0.025)
    assert (h.scale, h.translate, h.fliplr, h.mosaic, h.hsv_s) == (0.9, 0.1, 0.5, 1.0, 0.7)
    assert h.warmup_min_iters == 1000 and isinstance(h.warmup_min_iters, int)
    y = tmp_path / "h.yaml"
    y.write_text("lr0: 0.02\nmosaic: 0.0\n")
    h2 = load_hyp(y)
    assert h2.lr0 == 0.02 and h2.mosaic == 0.0 and h2.kp == 0.025
    y.write_text("lr00: 0.02\n")
    with pytest.raises(ConfigError, match="lr00"):
        load_hyp(y)
    y.write_text("fliplr: 2\n")
    with pytest.raises(ConfigError, match="fliplr"):
        load_hyp(y)


def test_inference_settings():
    assert (VAL_SETTINGS.conf, VAL_SETTINGS.iou, VAL_SETTINGS.conf_kp, VAL_SETTINGS.iou_kp) == (0.001, 0.65, 0.2, 0.25)
    assert (VAL_SETTINGS.conf_kp_person, VAL_SETTINGS.tolerance) == (0.3, 50.0)
    assert (PREDICT_SETTINGS.conf, PREDICT_SETTINGS.iou, PREDICT_SETTINGS.conf_kp_person) == (0.7, 0.45, 0.2)
    s = PREDICT_SETTINGS.replace(conf=0.5, iou=None)
    assert s.conf == 0.5 and s.iou == 0.45 and PREDICT_SETTINGS.conf == 0.7
    with pytest.raises(ConfigError, match="conf"):
        InferenceSettings(conf=1.5)
    with pytest.raises(ConfigError):
        KeypointSchema(names=("a",), flip_index=(0,), sigmas=(0.1,), kp_bbox=0.0)


@pytest.mark.slow
def test_configs_ship_in_wheel(tmp_path: Path):
    """Built-in configs must be reachable from a non-editable install: they are package data."""
    repo = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(repo)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("kapao-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for f in ("coco-kp.yaml", "crowdpose.yaml", "hyp-kapao.yaml"):
        assert f"kapao/configs/{f}" in names
    for f in ("__init__", "checkpoint", "unpickle", "official", "registry", "loader"):  # the weights subpackage
        assert f"kapao/weights/{f}.py" in names


def test_require_names_missing_data_and_how_to_get_it(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("KAPAO_DATASETS", str(tmp_path))
    cfg = load_dataset_config("crowdpose")
    with pytest.raises(DataError, match=r"crowdpose_test.json|images.*not found.*kapao download crowdpose"):
        cfg.require("test")
    (tmp_path / "datasets" / "crowdpose" / "images").mkdir(parents=True)
    (tmp_path / "datasets" / "crowdpose" / "crowdpose_test.json").write_text("{}")
    assert cfg.require("test") == cfg.split("test")
    y = tmp_path / "mine.yaml"
    y.write_text("base: coco\npath: nowhere\n")
    with pytest.raises(DataError, match="check 'path' and the 'val' entries of"):
        load_dataset_config(y).require("val")


# ----------------------------------------------------------------------------------------------
# Building a KeypointSchema (the one home for it)


def test_schema_generic_and_for_count():
    g = KeypointSchema.generic(5)
    assert g.names == ("kp0", "kp1", "kp2", "kp3", "kp4") and g.flip_index == (0, 1, 2, 3, 4)
    assert g.sigmas == (DEFAULT_SIGMA,) * 5 and g.skeleton == ()
    assert KeypointSchema.for_count(17) == KeypointSchema.builtin("coco") == load_dataset_config("coco").schema
    assert KeypointSchema.for_count(14) == KeypointSchema.builtin("crowdpose")
    assert KeypointSchema.for_count(21) == KeypointSchema.generic(21)
    for bad in (0, -3):
        with pytest.raises(ConfigError, match="at least 1"):
            KeypointSchema.for_count(bad)
    with pytest.raises(ConfigError, match="unknown built-in dataset 'mpii'.*coco, crowdpose"):
        KeypointSchema.builtin("mpii")


def test_schema_from_names_matches_builtins_and_guesses_flip_pairs():
    coco = KeypointSchema.builtin("coco")
    assert KeypointSchema.from_names(list(coco.names)) == coco  # flip pairs, sigmas and skeleton included
    s = KeypointSchema.from_names(["head", "left_hand", "right_hand", "right_foot", "left_foot", "tail"])
    assert s.flip_index == (0, 2, 1, 4, 3, 5) and s.sigmas == (DEFAULT_SIGMA,) * 6
    # a guess that is not a set of pairs (right_eye_left -> left_eye_left, which has no partner) gives none
    odd = KeypointSchema.from_names(["left_eye", "right_eye", "left_eye_left", "right_eye_left"])
    assert odd.flip_index == (0, 1, 2, 3)
    assert KeypointSchema.infer(14) == KeypointSchema.builtin("crowdpose")
    assert KeypointSchema.infer(2, ["left_x", "right_x"]).flip_index == (1, 0)
    with pytest.raises(ConfigError, match="3 keypoint names given for 2 keypoints"):
        KeypointSchema.infer(2, ["a", "b", "c"])


def test_schema_resolve_from_count_or_dataset():
    assert resolve_schema() == KeypointSchema.builtin("coco")
    assert resolve_schema(num_keypoints=14) == KeypointSchema.builtin("crowdpose")
    assert resolve_schema(num_keypoints=14, data="crowdpose") == KeypointSchema.builtin("crowdpose")
    with pytest.raises(ConfigError, match="17 keypoints requested, but dataset config 'crowdpose' has 14"):
        resolve_schema(num_keypoints=17, data="crowdpose")


def test_relative_base_is_read_next_to_the_yaml(tmp_path: Path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "parent.yaml").write_text("path: data\nval: images\nkpt_names: [a, b]\nflip_idx: [1, 0]\n"
                                                   "sigmas: [.1, .2]\n")
    child = tmp_path / "cfg" / "child.yaml"
    child.write_text("base: parent.yaml\nval_annotations: a.json\n")
    monkeypatch.chdir(tmp_path)  # the current folder holds no parent.yaml: only the YAML's own folder does
    cfg = load_dataset_config(child)
    assert cfg.schema.sigmas == (0.1, 0.2) and cfg.root == tmp_path / "cfg" / "data"
    child.write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match=f"{child}: base: .*missing.yaml"):
        load_dataset_config(child)
