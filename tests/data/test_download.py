"""`kapao download coco|crowdpose DIR` against a local HTTP server ($KAPAO_DATASETS_URL)."""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from kapao.cli.main import cli
from kapao.data.download import DATASETS, URL_ENV, download_dataset
from kapao.errors import DataError
from tests.weights.test_download import _send, _Server


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return buf.getvalue()


def _coco_files() -> dict[str, bytes]:
    ann = json.dumps({"images": [], "annotations": [], "categories": []}).encode()
    return {"annotations_trainval2017.zip": _zip({"annotations/person_keypoints_val2017.json": ann,
                                                  "annotations/person_keypoints_train2017.json": ann}),
            "val2017.zip": _zip({"val2017/000000000001.jpg": b"v"}),
            "train2017.zip": _zip({"train2017/000000000002.jpg": b"t"})}


def _routes(files: dict[str, bytes]) -> dict:
    return {f"/{name}": (lambda h, q, body=body: _send(h, body)) for name, body in files.items()}


def test_download_coco_into_the_yaml_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with _Server(_routes(_coco_files())) as srv:
        monkeypatch.setenv(URL_ENV, srv.url + "/{name}")
        res = CliRunner().invoke(cli, ["download", "coco", str(tmp_path / "coco")])
        assert res.exit_code == 0, res.output
        assert "3 pieces downloaded" in res.output and f"Results saved to {tmp_path / 'coco'}" in res.output
        root = tmp_path / "coco"
        assert (root / "annotations" / "person_keypoints_val2017.json").is_file()
        assert (root / "images" / "val2017" / "000000000001.jpg").read_bytes() == b"v"
        assert (root / "images" / "train2017" / "000000000002.jpg").read_bytes() == b"t"
        assert not list(root.rglob("*.zip")) and not list(root.rglob("*.part"))  # zips unpacked and deleted
        seen = len(srv.requests)
        res = CliRunner().invoke(cli, ["download", "coco", str(root)])
        assert res.exit_code == 0 and "all were in place" in res.output and len(srv.requests) == seen


def test_download_crowdpose_files_and_zip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    files = {"images.zip": _zip({"images/100000.jpg": b"c"}), "crowdpose_trainval.json": b"{}",
             "crowdpose_test.json": b"{}"}
    with _Server(_routes(files)) as srv:
        monkeypatch.setenv(URL_ENV, srv.url + "/{name}")
        fetched = download_dataset("crowdpose", tmp_path / "cp")
    assert sorted(p.name for p in (tmp_path / "cp").iterdir()) == ["crowdpose_test.json", "crowdpose_trainval.json",
                                                                   "images"]
    assert len(fetched) == 3 and (tmp_path / "cp" / "images" / "100000.jpg").read_bytes() == b"c"
    assert [f.name for f in DATASETS["crowdpose"]] == list(files)


def test_failures_leave_nothing_and_say_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    files = _coco_files()
    routes = {"/annotations_trainval2017.zip": lambda h, q: _send(h, files["annotations_trainval2017.zip"][:50],
                                                                  length=len(files["annotations_trainval2017.zip"]))}
    with _Server(routes) as srv:
        monkeypatch.setenv(URL_ENV, srv.url + "/{name}")
        with pytest.raises(DataError, match="is truncated .* run the command again"):
            download_dataset("coco", tmp_path / "a")
        assert not list((tmp_path / "a").rglob("*.*"))  # no partial file
    evil = {"annotations_trainval2017.zip": _zip({"../../outside.txt": b"x"})}
    with _Server(_routes(evil)) as srv:
        monkeypatch.setenv(URL_ENV, srv.url + "/{name}")
        with pytest.raises(DataError, match="points outside"):
            download_dataset("coco", tmp_path / "b" / "c")
    assert not (tmp_path / "outside.txt").exists() and not (tmp_path / "b" / "outside.txt").exists()
    monkeypatch.setenv(URL_ENV, "http://127.0.0.1:9/{name}")  # nothing listens on the discard port
    res = CliRunner().invoke(cli, ["download", "coco", str(tmp_path / "d")])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.strip().splitlines()[-1].startswith("Error: could not download http://127.0.0.1:9/annotations")
