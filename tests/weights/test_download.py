"""Downloads of named weights into the cache: once, then cache hits; gdown quietly behind our progress bar; cut,
wrong or offline downloads leave nothing and say what to fetch and where.

Never touches the real network: downloads go to a local http.server on 127.0.0.1.
"""
from __future__ import annotations

import http.server
import socket
import sys
import threading
import types
import urllib.parse

import pytest
import torch

from kapao.errors import WeightsError
from kapao.weights.checkpoint import save_checkpoint
from kapao.weights.download import download_weights, weights_url
from kapao.weights.loader import load_model
from kapao.weights.registry import GDRIVE_IDS, URL_ENV
from tests.weights.test_checkpoint import _outputs


class _Server:
    """A local HTTP server; `routes` maps a path to a function(handler, query) that answers."""

    def __init__(self, routes: dict):
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append(self.path)
                parts = urllib.parse.urlsplit(self.path)
                route = routes.get(parts.path)
                if route is None:
                    self.send_error(404)
                    return
                route(self, dict(urllib.parse.parse_qsl(parts.query)))

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _send(handler, body: bytes, ctype="application/octet-stream", length=None):
    handler.send_response(200)
    handler.send_header("Content-Type", ctype)
    handler.send_header("Content-Length", str(len(body) if length is None else length))
    handler.end_headers()
    handler.wfile.write(body)


@pytest.fixture(scope="module")
def served_bytes(tmp_path_factory, model_n) -> bytes:
    return save_checkpoint(tmp_path_factory.mktemp("srv") / "w.pt", model_n).read_bytes()


def test_download_once_then_cache_hit(cache, served_bytes, monkeypatch, model_n, image):
    routes = {"/file": lambda h, q: _send(h, served_bytes)}
    with _Server(routes) as srv:
        monkeypatch.setenv(URL_ENV, srv.url + "/file?id={id}&name={name}")
        model, info = load_model("kapao_s_coco")
        assert srv.requests == [f"/file?id={GDRIVE_IDS['kapao_s_coco']}&name=kapao_s_coco"]
        assert info["name"] == "kapao_s_coco" and info["path"] == str(cache / "kapao_s_coco.pt")
        assert (cache / "kapao_s_coco.pt").read_bytes() == served_bytes
        assert sorted(p.name for p in cache.iterdir()) == ["kapao_s_coco.pt"]
        assert torch.equal(_outputs(model, image), _outputs(model_n, image))
        load_model("kapao_s_coco.pt")
        assert len(srv.requests) == 1  # second time: from the cache, no request


def _fake_gdown(monkeypatch, answer):
    """Install a stand-in `gdown` module whose download(**kw) calls answer(kw) and records its calls."""
    calls = []

    def download(**kw):
        calls.append(kw)
        return answer(kw)

    monkeypatch.setitem(sys.modules, "gdown", types.SimpleNamespace(download=download))
    return calls


def test_drive_download_goes_through_gdown_quietly_with_our_progress_bar(cache, served_bytes, monkeypatch, capsys):
    def answer(kw):
        print("Downloading... From: To:")  # what gdown prints when not quiet: must not reach the user
        for i in range(0, len(served_bytes), 50_000):
            kw["output"].write(served_bytes[i:i + 50_000])
        return kw["output"]

    monkeypatch.delenv(URL_ENV, raising=False)
    calls = _fake_gdown(monkeypatch, answer)
    path = download_weights("kapao_m_crowdpose")
    assert path == cache / "kapao_m_crowdpose.pt" and path.read_bytes() == served_bytes
    assert sorted(p.name for p in cache.iterdir()) == ["kapao_m_crowdpose.pt"]
    assert len(calls) == 1 and calls[0]["id"] == GDRIVE_IDS["kapao_m_crowdpose"]
    assert calls[0]["quiet"] is True and calls[0]["use_cookies"] is False
    out, err = capsys.readouterr()
    assert "Downloading" not in out + err
    assert "kapao_m_crowdpose.pt" in err and "B/s" in err  # our tqdm bar
    download_weights("kapao_m_crowdpose")
    assert len(calls) == 1  # cached


def test_drive_download_failure_says_what_to_fetch_and_where(cache, monkeypatch, capsys):
    def refused(kw):
        kw["output"].write(b"partial")
        print("Access denied with the following error: Too many users have viewed or downloaded this file")
        return None  # what gdown does after printing an access error

    monkeypatch.delenv(URL_ENV, raising=False)
    _fake_gdown(monkeypatch, refused)
    with pytest.raises(WeightsError) as e:
        download_weights("kapao_l_crowdpose")
    msg = str(e.value)
    assert "Too many users have viewed" in msg
    assert "https://drive.google.com/file/d/146DW9ELzIBY2oDofPru446yLErxHrjJU/view" in msg
    assert f"save it as {cache / 'kapao_l_crowdpose.pt'}" in msg
    assert list(cache.iterdir()) == []
    assert "Access denied" not in capsys.readouterr().out

    def offline(kw):
        raise ConnectionError("Failed to establish a new connection")

    _fake_gdown(monkeypatch, offline)
    with pytest.raises(WeightsError, match="Failed to establish a new connection; offline.*by hand and save it as"):
        download_weights("kapao_l_crowdpose")
    assert list(cache.iterdir()) == []


def test_truncated_download_leaves_nothing(cache, served_bytes, monkeypatch):
    routes = {"/t": lambda h, q: _send(h, served_bytes[:100_000], length=len(served_bytes))}
    with _Server(routes) as srv:
        monkeypatch.setenv(URL_ENV, srv.url + "/t?id={id}")
        with pytest.raises(WeightsError, match=f"truncated \\(100000 of {len(served_bytes)} bytes\\)") as e:
            load_model("kapao_l_coco")
    assert str(cache / "kapao_l_coco.pt") in str(e.value)
    assert list(cache.iterdir()) == []


def test_download_that_is_not_weights_is_deleted(cache, monkeypatch):
    routes = {"/q": lambda h, q: _send(h, b"<html>Quota exceeded</html>", ctype="text/html"),
              "/junk": lambda h, q: _send(h, b"\x00" * 5000)}
    with _Server(routes) as srv:
        monkeypatch.setenv(URL_ENV, srv.url + "/q")
        with pytest.raises(WeightsError, match="web page instead of kapao_s_coco.pt"):
            download_weights("kapao_s_coco")
        monkeypatch.setenv(URL_ENV, srv.url + "/junk")
        with pytest.raises(WeightsError, match="not usable weights.*it was deleted"):
            download_weights("kapao_s_coco")
    assert list(cache.iterdir()) == []


def test_offline_error_says_what_to_fetch_and_where(cache, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/w/{{name}}.pt"
    monkeypatch.setenv(URL_ENV, url)
    with pytest.raises(WeightsError) as e:
        load_model("kapao_s_crowdpose")
    msg = str(e.value)
    assert f"http://127.0.0.1:{port}/w/kapao_s_crowdpose.pt" in msg
    assert f"save it as {cache / 'kapao_s_crowdpose.pt'}" in msg
    assert list(cache.iterdir()) == []
    monkeypatch.delenv(URL_ENV)  # the default: Google Drive, and the page to fetch it by hand
    assert weights_url("kapao_s_coco") == ("https://drive.usercontent.google.com/download?"
                                             "id=1hv0xwdbdf-Ym06Hpjy6wKyIklNmKmB99&export=download&confirm=t")
