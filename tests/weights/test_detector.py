"""YOLOv5 P6 detectors as a training start (kapao.weights.detector): stand-in release files (pickled
YOLOv5 modules, FP16) and their state dicts, the transfer counts of the official rule, and the
download of the named detectors from a local HTTP server."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from kapao.cli.main import cli
from kapao.errors import UsageError, WeightsError
from kapao.models.network import build_model
from kapao.weights.detector import check_detector_size, detector_transfer
from kapao.weights.download import resolve_weights
from kapao.weights.loader import load_model, load_weights
from kapao.weights.registry import DETECTORS, DIR_ENV, URL_ENV
from tests.weights.yolov5_standin import FileServer, build_detector, save_release_file

HEAD_OUT = {f"model.33.m.{i}.{p}" for i in range(4) for p in ("weight", "bias")}


@pytest.fixture(scope="module")
def release_s(tmp_path_factory) -> Path:
    return save_release_file(tmp_path_factory.mktemp("det") / "yolov5s6.pt", "s")


def _official_intersect(src: dict, dst: dict) -> set[str]:
    """YOLOv5's intersect_dicts with no exclusions, as the official train.py calls it."""
    return {k for k, v in src.items() if k in dst and v.shape == dst[k].shape}


@pytest.mark.parametrize("size", ["s", pytest.param("m", marks=pytest.mark.slow),
                                  pytest.param("l", marks=pytest.mark.slow), pytest.param("x", marks=pytest.mark.slow)])
def test_v5_transfer_is_the_official_one_less_anchor_grid(size, tmp_path):
    """Everything but the head's 4 output convolutions, exactly the official intersection minus anchor_grid
    (s: 463/471 here, 464/472 officially), with the detector's values (FP16 -> FP32)."""
    path = save_release_file(tmp_path / f"yolov5{size}6.pt", size)
    sd, info = load_weights(path)
    assert (info["format"], info["size"], info["version"], info["nc"]) == ("detector", size, "v5.0", 80)
    assert all(v.dtype != torch.float16 for v in sd.values())
    model = build_model(size, 17)
    own = model.state_dict()
    common = _official_intersect(build_detector(size).state_dict(), build_model(size, 17).state_dict())
    t = detector_transfer(model, sd, info)
    assert (t.transferred, t.total) == (len(common), len(own)) == (len(own) - 8, len(own))
    assert set(own) - common == HEAD_OUT
    after = model.state_dict()
    for k in ("model.0.conv.conv.weight", "model.10.cv2.bn.running_var", "model.32.m.0.cv1.conv.weight",
              "model.33.anchors"):
        assert torch.equal(after[k], sd[k]), k
    assert not torch.equal(after["model.33.m.0.bias"][:85], sd["model.33.m.0.bias"][:85])


@pytest.mark.slow
def test_counts_for_every_size_match_the_issue():
    """The official counts the issue measured: s 464/472, m 644/652 (kapao: one lower each)."""
    for size, (n, total) in {"s": (464, 472), "m": (644, 652)}.items():
        det, kapao = build_detector(size).state_dict(), build_model(size, 17).state_dict()
        official = {**kapao, "model.33.anchor_grid": torch.zeros(4, 1, 3, 1, 1, 2)}  # the official network's names
        assert (len(_official_intersect(det, official)), len(official)) == (n, total), size
        assert (len(_official_intersect(det, kapao)), len(kapao)) == (n - 1, total - 1), size


@pytest.mark.slow
def test_plain_state_dict_transfers_the_same(release_s, tmp_path):
    plain = save_release_file(tmp_path / "sd.pt", "s", plain_state_dict=True)
    sd, info = load_weights(plain)
    ref_sd, ref_info = load_weights(release_s)
    assert info["format"] == "detector" and info["size"] == "s"
    torch.manual_seed(0)
    a = build_model("s", 17)
    torch.manual_seed(0)
    b = build_model("s", 17)
    assert detector_transfer(a, sd, info) == detector_transfer(b, ref_sd, ref_info)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_v6_file_transfers_what_matches_and_says_which_layers_start_fresh(tmp_path):
    """A v6.0+ file (Conv stem, SPPF): names and shapes, within layers of the same kind; the C3/SPPF
    1x1 convolutions whose shapes equal kapao's SPP/C3 ones at layers 10-11 stay out."""
    sd, info = load_weights(save_release_file(tmp_path / "v6.pt", "s", "v6.0"))
    assert info["version"] == "v6.0+" and info["layer_kinds"][11] == "SPPF"
    model = build_model("s", 17)
    t = detector_transfer(model, sd, info)
    blind = _official_intersect(sd, build_model("s", 17).state_dict())
    assert t.skipped_layers == (0, 10, 11)
    assert t.transferred == len({k for k in blind if k.split(".")[1] not in ("0", "10", "11")}) == 403
    assert len(blind) == 417  # what intersect_dicts alone would copy


def test_detector_is_not_a_pose_model(release_s, tmp_path, monkeypatch):
    with pytest.raises(WeightsError, match="is a YOLOv5 object detector .* not a KAPAO pose model.*kapao train"):
        load_model(release_s)
    monkeypatch.setenv(DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(URL_ENV, "http://127.0.0.1:9/{name}.pt")  # never asked: refused before any download
    with pytest.raises(WeightsError, match="yolov5m6 is a YOLOv5 object detector"):
        load_model("yolov5m6")


def test_size_mismatch_is_a_usage_error():
    with pytest.raises(UsageError, match=r"YOLOv5-m6 detector, which cannot start kapao-s .* --size m"):
        check_detector_size({"size": "m", "path": "yolov5m6.pt"}, "s")
    check_detector_size({"size": "m"}, None)


@pytest.mark.slow
def test_size_mismatch_is_one_line(tmp_path, coco_mini_yaml):
    path = save_release_file(tmp_path / "yolov5m6.pt", "m")
    res = CliRunner().invoke(cli, ["train", "--data", str(coco_mini_yaml), "--weights", str(path), "--size", "s",
                                   "--imgsz", "128", "--device", "cpu", "--project", str(tmp_path / "runs")])
    assert res.exit_code == 2, res.output
    assert "cannot start kapao-s" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "runs" / "exp").exists()  # the empty run folder is removed


def test_scratch_and_weights_conflict(coco_mini_yaml):
    res = CliRunner().invoke(cli, ["train", "--data", str(coco_mini_yaml), "--scratch", "--weights", "yolov5s6"])
    assert res.exit_code == 2 and "give one of them" in res.output


# ----------------------------------------------------------------------------------------------
# The named detectors: registry rows and download


def test_registry_rows_are_the_v5_release_assets():
    assert set(DETECTORS) == {"yolov5s6", "yolov5m6", "yolov5l6", "yolov5x6"}
    for name, e in DETECTORS.items():
        assert e.url == f"https://github.com/ultralytics/yolov5/releases/download/v5.0/{name}.pt"
        assert e.size == name[6] and e.sha256 is None  # none published: not invented


def test_download_once_atomically_then_from_the_cache(tmp_path, monkeypatch, release_s):
    served = tmp_path / "srv"
    served.mkdir()
    (served / "yolov5s6.pt").write_bytes(release_s.read_bytes())
    (served / "yolov5m6.pt").write_bytes(release_s.read_bytes())  # the wrong size under m's name
    monkeypatch.setenv(DIR_ENV, str(tmp_path / "cache"))
    with FileServer(served) as srv:
        monkeypatch.setenv(URL_ENV, srv.url + "/{name}.pt")
        path, name = resolve_weights("yolov5s6")
        assert (path, name) == (tmp_path / "cache" / "yolov5s6.pt", "yolov5s6")
        assert path.read_bytes() == release_s.read_bytes()
        resolve_weights("yolov5s6.pt")
        assert srv.requests == ["/yolov5s6.pt"]
        with pytest.raises(WeightsError, match="is a YOLOv5-s detector, not the YOLOv5-m6 detector; it was deleted"):
            resolve_weights("yolov5m6")
        with pytest.raises(WeightsError, match=r"HTTP 404.*download .*/yolov5l6.pt by hand and save it as "
                                               rf"{tmp_path / 'cache' / 'yolov5l6.pt'}"):
            resolve_weights("yolov5l6")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["yolov5s6.pt"]  # no partial files


def test_offline_default_start_names_the_file_and_scratch(tmp_path, monkeypatch, coco_mini_yaml):
    """`kapao train --size m` offline: one line with the release URL, the cache path and --scratch."""
    monkeypatch.setenv(DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(URL_ENV, "http://127.0.0.1:9/{name}.pt")  # the discard port: refused
    res = CliRunner().invoke(cli, ["train", "--data", str(coco_mini_yaml), "--size", "m", "--imgsz", "128",
                                   "--device", "cpu", "--project", str(tmp_path / "runs")])
    assert res.exit_code == 1, res.output
    dest = tmp_path / "cache" / "yolov5m6.pt"
    assert f"by hand and save it as {dest}; or train from random initialisation with --scratch" in res.output
    assert "Traceback" not in res.output


def test_info_describes_a_detector_name(tmp_path, monkeypatch):
    monkeypatch.setenv(DIR_ENV, str(tmp_path / "cache"))
    res = CliRunner().invoke(cli, ["info", "--weights", "yolov5l6"])
    assert res.exit_code == 0, res.output
    assert "releases/download/v5.0/yolov5l6.pt" in res.output and "sha256: not published" in res.output


def test_a_p5_detector_is_refused(tmp_path):
    """yolov5s.pt-like (3 output levels): the names overlap kapao's by accident, so nothing is transferred."""
    sd = {k: v.float() for k, v in build_detector("s").state_dict().items()}
    sd["model.33.anchors"] = sd["model.33.anchors"][:3]
    torch.save(sd, tmp_path / "p5.pt")
    with pytest.raises(WeightsError, match="3 output levels, not a P6 one"):
        load_weights(tmp_path / "p5.pt")
