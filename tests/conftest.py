"""Shared fixtures: the real tiny datasets in ../shared/data (or $KAPAO_TEST_DATA)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = Path(os.environ.get("KAPAO_TEST_DATA", REPO.parent / "shared" / "data"))


def _require(rel: str) -> Path:
    path = TEST_DATA / rel
    if not path.exists():
        msg = f"test data {path} is missing (set KAPAO_TEST_DATA to the folder holding coco-mini/, crowdpose-mini/, videos/)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def coco_mini() -> Path:
    """Folder with images/ and person_keypoints.json (4 images, 14 persons, K=17)."""
    return _require("coco-mini")


@pytest.fixture(scope="session")
def crowdpose_mini() -> Path:
    """Folder with images/ and crowdpose.json (2 images, 5 persons, K=14, crowdIndex set)."""
    return _require("crowdpose-mini")


@pytest.fixture(scope="session")
def test_video() -> Path:
    """5-frame 1280x720 30 fps video."""
    return _require("videos/posetrack-000001.mp4")


@pytest.fixture
def coco_mini_yaml(coco_mini: Path, tmp_path: Path) -> Path:
    """A dataset YAML (base: coco) whose train and val splits are coco-mini."""
    p = tmp_path / "coco-mini.yaml"
    p.write_text(
        f"base: coco\nname: coco-mini\npath: {coco_mini}\ntrain: images\nval: images\n"
        "train_annotations: person_keypoints.json\nval_annotations: person_keypoints.json\n"
    )
    return p


@pytest.fixture
def crowdpose_mini_yaml(crowdpose_mini: Path, tmp_path: Path) -> Path:
    """A dataset YAML (base: crowdpose) whose train/val/test splits are crowdpose-mini."""
    p = tmp_path / "crowdpose-mini.yaml"
    p.write_text(
        f"base: crowdpose\nname: crowdpose-mini\npath: {crowdpose_mini}\ntrain: images\nval: images\ntest: images\n"
        "train_annotations: crowdpose.json\nval_annotations: crowdpose.json\ntest_annotations: crowdpose.json\n"
    )
    return p
