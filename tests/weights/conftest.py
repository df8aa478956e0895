"""Fixtures of the weights tests: a seeded size-n COCO model, an input image, a private weights cache folder."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kapao.cfg.dataset import load_dataset_config
from kapao.models.network import KapaoModel
from kapao.weights.registry import DIR_ENV


@pytest.fixture(scope="module")
def model_n() -> KapaoModel:
    torch.manual_seed(0)
    return KapaoModel("n", load_dataset_config("coco").schema).eval()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(DIR_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"
