"""Shared fixtures: the real tiny datasets in ../shared/data (or $KAPAO_TEST_DATA)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = Path(os.environ.get("KAPAO_TEST_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in its own folder, so a command's default runs/ output never lands in the repo,
    and caches exported models there (not in the user's cache)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KAPAO_CACHE_DIR", str(tmp_path / "kapao-cache"))


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


def _mini_yaml(folder: Path, base: str, annotations: str, out: Path) -> Path:
    """A dataset YAML extending built-in `base` whose train/val/test splits all are `folder`."""
    splits = "".join(f"{s}: images\n{s}_annotations: {annotations}\n" for s in ("train", "val", "test"))
    out.write_text(f"base: {base}\nname: {out.stem}\npath: {folder}\n{splits}")
    return out


@pytest.fixture
def coco_mini_yaml(coco_mini: Path, tmp_path: Path) -> Path:
    """A dataset YAML (base: coco) whose splits are coco-mini."""
    return _mini_yaml(coco_mini, "coco", "person_keypoints.json", tmp_path / "coco-mini.yaml")


@pytest.fixture
def crowdpose_mini_yaml(crowdpose_mini: Path, tmp_path: Path) -> Path:
    """A dataset YAML (base: crowdpose) whose splits are crowdpose-mini."""
    return _mini_yaml(crowdpose_mini, "crowdpose", "crowdpose.json", tmp_path / "crowdpose-mini.yaml")
