"""kapao.cfg.settings.read_yaml: the one YAML reader refuses hostile files fast, in one line."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from kapao.cfg.settings import read_yaml
from kapao.errors import ConfigError


def _laughs(levels: int) -> str:
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text, phrase", [
    (_laughs(12), "uses the YAML alias *l0"),
    ("kpt_shape: [9, 3]\n" + _laughs(30), "uses the YAML alias"),
    ("a: &x 1\nb: *x\n", "uses the YAML alias *x"),
    ("base: &b {x: 1}\nother:\n  <<: *b\n", "uses the YAML alias *b"),
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nesting deeper than 64 levels"),
    ("a: [" + ", ".join(["1"] * 100_001) + "]\n", "more than 100000 values"),
    ("a: '" + "x" * (1 << 20) + "'\n", "larger than 1 MiB"),
    ("a: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
    ("a: 1\n\x00b: 2\n", "control characters are not allowed"),
    ("\xff\xfe", "not a text (YAML) file"),
    ("- 1\n- 2\n", "expected a mapping"),
    ("a: [1\n", "not valid YAML"),
])
def test_hostile_yaml_is_refused_within_a_second(tmp_path: Path, text: str, phrase: str):
    path = tmp_path / "x.yaml"
    path.write_bytes(text.encode("utf-8", "surrogateescape") if not text.startswith("\xff") else b"\xff\xfe\x00")
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=None) as e:
        read_yaml(path)
    assert time.perf_counter() - t0 < 1.0
    msg = str(e.value)
    assert phrase in msg and str(path) in msg and len(msg.splitlines()) == 1, msg


def test_special_files_are_refused(tmp_path: Path):
    import os

    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        read_yaml(fifo)  # would block forever if opened
    with pytest.raises(ConfigError, match="not a regular file"):
        read_yaml(Path("/dev/zero"))  # never read to its end
    with pytest.raises(ConfigError, match="cannot read config file"):
        read_yaml(tmp_path)


def test_plain_yaml_still_reads(tmp_path: Path):
    path = tmp_path / "ok.yaml"
    path.write_text("\ufeffa: 1\nb: [x, y]\nc: {d: 2.5}\n")
    assert read_yaml(path) == {"a": 1, "b": ["x", "y"], "c": {"d": 2.5}}
