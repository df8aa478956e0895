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
from kapao.weights import registry
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

    class ConnectionError(OSError):  # as requests names it: raised with urllib3's long text
        pass

    def offline(kw):
        raise ConnectionError("HTTPSConnectionPool(host='drive.google.com', port=443): Max retries exceeded with url: "
                              "/uc?id=x (Caused by NewConnectionError('<urllib3.connection.HTTPSConnection object at "
                              "0x7f>: Failed to establish a new connection: [Errno -3] Temporary failure in name resolution'))")

    _fake_gdown(monkeypatch, offline)
    capsys.readouterr()
    with pytest.raises(WeightsError) as e:
        download_weights("kapao_l_crowdpose")
    assert str(e.value) == ("could not download kapao_l_crowdpose: Google Drive cannot be reached (offline?); download "
                            "https://drive.google.com/file/d/146DW9ELzIBY2oDofPru446yLErxHrjJU/view by hand and save it "
                            f"as {cache / 'kapao_l_crowdpose.pt'}")
    assert capsys.readouterr().err == ""  # no empty progress bar before the one line
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


def _pin(monkeypatch, name: str, **fields) -> None:
    """Give the table's entry for `name` a recorded size/sha256 (the real ones are not known here)."""
    import dataclasses

    from kapao.weights import download

    entry = dataclasses.replace(registry.REGISTRY[name], **fields)
    monkeypatch.setitem(registry.REGISTRY, name, entry)
    monkeypatch.setattr(download, "REGISTRY", registry.REGISTRY)


def test_a_download_is_checked_against_the_recorded_size_and_sha256(cache, served_bytes, monkeypatch, caplog):
    """A different file served under an official name is deleted with one line; the right one is kept."""
    import hashlib
    import logging

    routes = {"/f": lambda h, q: _send(h, served_bytes)}
    right = hashlib.sha256(served_bytes).hexdigest()
    with _Server(routes) as srv:
        monkeypatch.setenv(URL_ENV, srv.url + "/f?n={name}")
        _pin(monkeypatch, "kapao_s_coco", sha256="0" * 64)
        with pytest.raises(WeightsError, match=r"is not the official file \(sha256 .*it was deleted") as e:
            download_weights("kapao_s_coco")
        assert len(str(e.value).splitlines()) == 1 and not cache.exists() or list(cache.iterdir()) == []
        _pin(monkeypatch, "kapao_s_coco", file_bytes=len(served_bytes) + 1, sha256=None)
        with pytest.raises(WeightsError, match=f"offers {len(served_bytes)} bytes for kapao_s_coco, not the"):
            download_weights("kapao_s_coco")
        _pin(monkeypatch, "kapao_s_coco", file_bytes=len(served_bytes), sha256=right)
        assert download_weights("kapao_s_coco").read_bytes() == served_bytes
        _pin(monkeypatch, "kapao_m_coco", sha256=None)
        with caplog.at_level(logging.INFO, logger="kapao"):
            download_weights("kapao_m_coco")
        assert f"no sha256 recorded to check the download against; it has {len(served_bytes)} bytes, sha256 {right}" \
            in caplog.text


def test_a_dripping_server_is_given_up(cache, served_bytes, monkeypatch):
    """One byte every 0.2 s never trips the socket timeout; the minimum rate does."""
    import time

    from kapao.weights import download

    def drip(h, q):
        h.send_response(200)
        h.send_header("Content-Length", str(len(served_bytes)))
        h.end_headers()
        for b in served_bytes[:40]:
            h.wfile.write(bytes([b]))
            h.wfile.flush()
            time.sleep(0.05)

    monkeypatch.setattr(download, "MIN_RATE_AFTER", 0.5)
    monkeypatch.setattr(download, "MIN_RATE", 1000)
    with _Server({"/d": drip}) as srv:
        monkeypatch.setenv(URL_ENV, srv.url + "/d?n={name}")
        t0 = time.monotonic()
        with pytest.raises(WeightsError, match=r"averages .* kB/s, below the 1 kB/s minimum.*partial file was deleted"):
            download_weights("kapao_l_coco")
        assert time.monotonic() - t0 < 5
    assert list(cache.iterdir()) == []


@pytest.mark.parametrize("url, phrase", [
    ("not a url", "no http:// or https:// URL with a host"),
    ("ftp://mirror/{name}.pt", "no http:// or https:// URL with a host"),
    ("http://[::1/{name}", "cannot be parsed"),
    ("http://host:port/{name}", "cannot be parsed"),
    ("https://mirror.example/{name} .pt", "spaces or control characters"),
    ("file:///etc/{name}", "no http:// or https:// URL with a host"),
])
def test_a_malformed_mirror_url_is_named(cache, monkeypatch, url, phrase):
    monkeypatch.setenv(URL_ENV, url)
    with pytest.raises(WeightsError) as e:
        download_weights("kapao_s_coco")
    msg = str(e.value)
    assert msg.startswith(f"{URL_ENV}={url!r}: ") and phrase in msg and len(msg.splitlines()) == 1
