"""The table of named weights (kapao.weights.registry): complete entries, the README's copy, and the
places that read it (load_weights, KAPAO's default input size, `kapao info`)."""
from __future__ import annotations

import dataclasses
import re
import socket
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from kapao.cfg.schema import BUILTIN_DATASETS, KeypointSchema
from kapao.cli.main import cli
from kapao.errors import WeightsError
from kapao.models.network import SIZES, KapaoModel
from kapao.weights import registry
from kapao.weights.checkpoint import save_checkpoint
from kapao.weights.loader import load_weights
from kapao.weights.registry import DIR_ENV, weights_dir, weights_path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_entry_is_complete():
    assert registry.DEFAULT_WEIGHTS in registry.REGISTRY
    assert registry.WEIGHT_NAMES == tuple(registry.REGISTRY)
    assert len({e.gdrive_id for e in registry.REGISTRY.values()}) == len(registry.REGISTRY)
    for name, e in registry.REGISTRY.items():
        assert e.name == name == f"kapao_{e.size}_{e.dataset}"
        assert e.size in SIZES and e.dataset in BUILTIN_DATASETS
        assert re.fullmatch(r"[\w-]{33}", e.gdrive_id) and e.gdrive_id in e.url and e.gdrive_id in e.page_url
        assert registry.GDRIVE_IDS[name] == e.gdrive_id
        assert e.ap is not None and 50 < e.ap < 80 and e.benchmark
        assert e.imgsz == 1280 and (e.file_bytes is None or e.file_bytes > 0)
        assert e.schema == KeypointSchema.builtin(e.dataset)
        assert e.schema.num_keypoints == {"coco": 17, "crowdpose": 14}[e.dataset]
    with pytest.raises(dataclasses.FrozenInstanceError):
        registry.REGISTRY["kapao_s_coco"].imgsz = 640  # type: ignore[misc]


def _readme_rows() -> list[list[str]]:
    lines = README.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| name | dataset | input size"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_readme_table_equals_the_registry():
    expected = [[e.name, e.dataset, str(e.imgsz), f"{e.ap:.1f}", e.benchmark] for e in registry.REGISTRY.values()]
    assert _readme_rows() == expected


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(registry.DIR_ENV, str(tmp_path / "cache"))
    with socket.socket() as s:  # nothing listens here: any download attempt fails at once
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv(registry.URL_ENV, f"http://127.0.0.1:{s.getsockname()[1]}/{{name}}.pt")
    (tmp_path / "cache").mkdir()
    return tmp_path / "cache"


@pytest.mark.slow
def test_load_weights_and_kapao_take_the_native_imgsz_from_the_table(cache, monkeypatch):
    from kapao.infer.predictor import KAPAO

    torch.manual_seed(0)
    model = KapaoModel("n", KeypointSchema.builtin("coco"))
    save_checkpoint(cache / "kapao_m_coco.pt", model)
    plain = save_checkpoint(cache / "mine.pt", model)
    monkeypatch.setitem(registry.REGISTRY, "kapao_m_coco",
                        dataclasses.replace(registry.REGISTRY["kapao_m_coco"], imgsz=640))
    _, info = load_weights("kapao_m_coco")
    assert info["imgsz"] == 640 and info["name"] == "kapao_m_coco"
    assert KAPAO("kapao_m_coco", device="cpu").default_imgsz == 640
    assert KAPAO(str(plain), device="cpu").default_imgsz == registry.DEFAULT_IMGSZ == 1280
    assert "imgsz" not in load_weights(plain)[1]


def test_cli_info_lists_names_and_describes_one_without_downloading(cache):
    res = CliRunner().invoke(cli, ["info", "--names"])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(registry.REGISTRY)
    assert "63.0 AP" in lines[0] and "68.9 AP (CrowdPose test" in lines[-1]
    res = CliRunner().invoke(cli, ["info", "--weights", "kapao_l_crowdpose"])
    assert res.exit_code == 0, res.output
    e = registry.REGISTRY["kapao_l_crowdpose"]
    assert f"Google Drive id: {e.gdrive_id}" in res.output and "published AP: 68.9" in res.output
    assert f"cached as: {cache / 'kapao_l_crowdpose.pt'}" in res.output and "not downloaded yet" in res.output
    assert list(cache.iterdir()) == []
    help_text = CliRunner().invoke(cli, ["predict", "--help"]).output
    assert "kapao_l_crowdpose" in " ".join(help_text.split())


def test_weights_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv(DIR_ENV, str(tmp_path / "mine"))
    assert weights_dir() == tmp_path / "mine"
    assert weights_path("kapao_m_crowdpose.pt") == tmp_path / "mine" / "kapao_m_crowdpose.pt"
    monkeypatch.delenv(DIR_ENV)
    pkg = tmp_path / "checkout" / "kapao"
    pkg.mkdir(parents=True)
    monkeypatch.setattr(registry, "_PACKAGE_DIR", pkg)
    if sys.platform.startswith("linux"):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert weights_dir() == tmp_path / "xdg" / "kapao"  # installed package: user cache
    (tmp_path / "checkout" / "weights").mkdir()
    assert weights_dir() == tmp_path / "checkout" / "weights"  # source checkout: repo weights/
    with pytest.raises(WeightsError, match="unknown weights name 'kapao_q_coco'"):
        weights_path("kapao_q_coco")
