"""The third hostile campaign as a table: each case is a command a hostile newcomer tries, with its exit
code and the phrase its one error line must hold; nothing outside the folders the case names (its --out,
the runs/ folder under the working folder) may appear, change or vanish (a listing of the whole parent
folder is compared before and after).

Areas: paths (file names leading out of their root), yaml (hostile YAML in every place one is read),
names (bytes and control characters in file names), runs (run folders written by two processes or
edited by hand), onnx (hostile metadata), tracker (tracker keys), mirror (malformed mirror URLs).
With KAPAO_CAMPAIGN_LOG set, every case also appends "area<TAB>OK|weak|bad<TAB>id" to that file
(weak: the right exit code but not the promised line; bad: a wrong exit code, a crash, a traceback or
a file touched outside), which is how the campaign's before/after table is counted.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from kapao.cli.main import cli

LAUGHS = "".join([f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 12)])
HOSTILE_YAML = {  # name -> text; every one is refused in one line, in well under a second
    "laughs": "kpt_shape: [9, 3]\nflip_idx: [0, 1, 2, 3, 4, 5, 6, 7, 8]\nl0: &l0 [lol, lol, lol, lol, lol, lol, lol, "
              "lol, lol]\n" + LAUGHS,
    "alias": "base: coco\npath: &p .\nval: *p\n",
    "merge": "base: &b {name: x}\nother:\n  <<: *b\n",
    "deep": "a: " + "[" * 3000 + "]" * 3000 + "\n",
    "wide": "a: [" + ", ".join(["1"] * 100_001) + "]\n",
    "huge": "a: '" + "x" * (1 << 20) + "'\n",
    "pytag": "a: !!python/object/apply:os.system ['touch pwned']\n",
    "nul": "a: 1\n\x00b: 2\n",
    "list": "- 1\n- 2\n",
    "broken": "a: [1\n",
}
YAML_PHRASE = {"laughs": "uses the YAML alias *l0", "alias": "uses the YAML alias *p", "merge": "uses the YAML alias *b",
               "deep": "nesting deeper than 64 levels", "wide": "more than 100000 values", "huge": "larger than 1 MiB",
               "pytag": "not valid YAML", "nul": "control characters are not allowed", "list": "expected a mapping",
               "broken": "not valid YAML"}
TRAVERSAL = {  # file_name forms that lead out of the image folder
    "dotdot": "../../../x/y.jpg", "abs": "/etc/hostname", "deep_dotdot": "a/b/../../../../../../tmp/x.jpg",
    "back_in": "../images/../../escape.jpg", "nul": "a\x00b.jpg", "dot": ".", "empty": "", "parent": "..",
    "link_dir": "outlink/y.jpg", "abs_inside_twin": "/../etc/passwd",
}
ONNX_META = {  # key -> hostile value (valid kapao metadata otherwise)
    "format_version": ["abc", "-1", "99", "1.5", "[]"], "schema": ["[" * 3000 + "]" * 3000, "{", "[]", '{"kpt_names": 3}'],
    "imgsz": ["[64]", "[64, -1]", "[1e12, 64]", "null"], "batch": ["0", '"1"'], "stride": ["7", "abc"],
    "dynamic": ["maybe"], "half": ["1"], "num_keypoints": ["5", "x"],
}
ONNX_PHRASE = {"format_version": "metadata format_version is", "schema": "metadata schema", "imgsz": "metadata imgsz is",
               "batch": "metadata batch is", "stride": "metadata stride is", "dynamic": "metadata dynamic is",
               "half": "metadata half is", "num_keypoints": "metadata num_keypoints is"}
TRACKER = {
    "gmc": ("tracker_type: botsort\ngmc_method: magic\n", "'gmc_method' must be one of"),
    "unknown": ("tracker_type: bytetrack\ntrak_buffer: 3\n", "unknown key(s) 'trak_buffer'"),
    "foreign_key": ("tracker_type: bytetrack\ngmc_method: orb\n", "unknown key(s) 'gmc_method'"),
    "fuse": ("tracker_type: botsort\nfuse_score: maybe\n", "'fuse_score' must be true or false"),
    "reid": ("tracker_type: botsort\nwith_reid: 1\n", "'with_reid' must be true or false"),
    "prox": ("tracker_type: botsort\nproximity_thresh: 9\n", "'proximity_thresh' must be a number in [0, 1]"),
    "buffer": ("tracker_type: bytetrack\ntrack_buffer: 2.5\n", "'track_buffer' must be a whole number"),
    "type": ("tracker_type: deepsort\n", "'tracker_type' must be one of"),
    "alias": ("tracker_type: bytetrack\nx: &a 1\ny: *a\n", "uses the YAML alias *a"),
    "laughs": ("tracker_type: bytetrack\nl0: &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + LAUGHS, "uses the YAML alias *l0"),
}
MIRROR = {"no_scheme": "mirror/{name}.pt", "ftp": "ftp://mirror/{name}.pt", "ipv6": "http://[::1/{name}",
          "port": "http://host:port/{name}", "space": "http://mirror/{name} .pt", "file": "file:///etc/{name}",
          "empty_host": "http:///{name}.pt", "ctrl": "http://mirror/\x1b{name}"}
NAMES = {  # file names a camera, a zip from another OS or a hostile user leaves
    "latin1": b"caf\xe9.jpg", "ff": b"bad\xffname.jpg", "utf16ish": b"\xfe\xffx.jpg", "newline": b"a\nb.jpg",
    "escape": b"\x1b[31mred.jpg", "tab": b"a\tb.jpg", "space": b" lead and trail .jpg", "dash": b"-x.jpg",
    "unicode": "смотри ✓.jpg".encode(), "long": b"x" * 240 + b".jpg", "percent": b"%s%n%d.jpg",
    "glob": b"[a]*?.jpg",
}


def _cases() -> list[tuple[str, str, list[str], int, str]]:
    """(area, id, argv, exit code, phrase of the last line). {w}: the inputs; {t}: the case's own folder."""
    out: list[tuple[str, str, list[str], int, str]] = []
    tiny = ["--weights", "{w}/tiny.pt", "--device", "cpu", "--imgsz", "64"]
    for k, name in TRAVERSAL.items():  # paths: a file_name per form, through every verb that reads it
        nul = k == "nul"
        want = "holds a NUL byte" if nul else "is empty" if k == "empty" else "leads outside"
        for copy in ([], ["--copy-images"]):
            out.append(("paths", f"convert-{k}{'-copy' if copy else ''}",
                        ["convert", "--data", f"{{w}}/trav_{k}.yaml", "--to", "yolo", "--out", "{t}/out", *copy], 1, want))
        found = "needs a 'file_name'" if k == "empty" else "1 image entr(ies) lead outside the image folder"
        out.append(("paths", f"check-{k}", ["check", "--data", f"{{w}}/trav_{k}.yaml", "--samples", "0",
                                             "--project", "{t}/runs"], 1, f"report:{found}"))
    for k in ("dotdot", "abs", "nul", "link_dir"):
        out.append(("paths", f"val-{k}", ["val", "--data", f"{{w}}/trav_{k}.yaml", "--batch", "4", "--workers", "0",
                                          "--project", "{t}/runs", *tiny], 0, "Results saved to"))
    out.append(("paths", "convert-dup", ["convert", "--data", "{w}/trav_dup.yaml", "--to", "yolo", "--out", "{t}/out"], 1,
                "is written twice"))
    out.append(("paths", "convert-dup-copy", ["convert", "--data", "{w}/trav_dup.yaml", "--to", "yolo", "--out", "{t}/out",
                                              "--copy-images"], 1, "is written twice"))
    for k in ("dotdot", "abs", "twin"):
        out.append(("paths", f"check-yolo-list-{k}", ["check", "--data", f"{{w}}/yolo_{k}/data.yaml", "--samples", "0",
                                                      "--project", "{t}/runs"], 1,
                    "report:1 image entr(ies) lead outside the image folder"))
    for k in HOSTILE_YAML:  # yaml: every place a YAML is read
        phrase = YAML_PHRASE[k]
        out += [("yaml", f"check-{k}", ["check", "--data", f"{{w}}/y_{k}.yaml"], 2, phrase),
                ("yaml", f"val-{k}", ["val", "--data", f"{{w}}/y_{k}.yaml"], 2, phrase),
                ("yaml", f"train-data-{k}", ["train", "--data", f"{{w}}/y_{k}.yaml"], 2, phrase),
                ("yaml", f"info-{k}", ["info", "--data", f"{{w}}/y_{k}.yaml"], 2, phrase),
                ("yaml", f"convert-{k}", ["convert", "--data", f"{{w}}/y_{k}.yaml", "--to", "yolo", "--out", "{t}/o"], 2,
                 phrase),
                ("yaml", f"train-hyp-{k}", ["train", "--data", "{w}/mini.yaml", "--hyp", f"{{w}}/y_{k}.yaml",
                                            "--epochs", "1", "--project", "{t}/runs", "--device", "cpu"], 2, phrase),
                ("yaml", f"track-{k}", ["track", "{w}/clip.mp4", "--tracker", f"{{w}}/y_{k}.yaml", *tiny], 2, phrase),
                ("yaml", f"resume-{k}", ["predict", "--resume", f"{{w}}/run_{k}", *tiny[:2]], 2, phrase)]
    for k in NAMES:  # names: drawn images, videos and datasets under hostile names
        out.append(("names", f"predict-{k}", ["predict", f"{{w}}/names/{k}", "--project", "{t}/runs", *tiny], 0,
                    "Results saved to"))
    for k in ("ff", "newline", "escape", "unicode"):
        out.append(("names", f"predict-video-{k}", ["predict", f"{{w}}/vnames/{k}", "--project", "{t}/runs", *tiny], 0,
                    "Results saved to"))
        out.append(("names", f"track-video-{k}", ["track", f"{{w}}/vnames/{k}", "--project", "{t}/runs", *tiny], 0,
                    "Results saved to"))
    for k, (_, phrase) in TRACKER.items():  # tracker keys
        out.append(("tracker", f"track-{k}", ["track", "{w}/clip.mp4", "--tracker", f"{{w}}/t_{k}.yaml", *tiny], 2, phrase))
        out.append(("tracker", f"predict-track-{k}", ["predict", "{w}/clip.mp4", "--track", "--tracker",
                                                      f"{{w}}/t_{k}.yaml", *tiny], 2, phrase))
    for key, values in ONNX_META.items():  # onnx: hostile metadata on a real graph
        for i, _ in enumerate(values):
            for verb in ("predict", "info"):
                argv = (["predict", "{w}/img.jpg", "--weights", f"{{w}}/onnx_{key}_{i}.onnx", "--device", "cpu"]
                        if verb == "predict" else ["export", "--weights", f"{{w}}/onnx_{key}_{i}.onnx", "-o", "{t}/x.onnx"])
                want = ONNX_PHRASE[key] if verb == "predict" else "is an ONNX model, not a checkpoint"
                out.append(("onnx", f"{verb}-{key}-{i}", argv, 1, want))
    out.append(("onnx", "predict-no-head", ["predict", "{w}/img.jpg", "--weights", "{w}/onnx_nohead.onnx", "--device",
                                            "cpu"], 1, "it is no kapao export of this schema"))
    for k in MIRROR:  # mirror: malformed KAPAO_WEIGHTS_URL
        for verb in (["predict", "{w}/img.jpg", "--weights", "kapao_m_coco", "--device", "cpu"],
                     ["val", "--data", "{w}/mini.yaml", "--weights", "kapao_l_coco", "--device", "cpu"]):
            out.append(("mirror", f"{verb[0]}-{k}", [f"env:KAPAO_WEIGHTS_URL={MIRROR[k]}", *verb], 1,
                        "KAPAO_WEIGHTS_URL="))
    run_cases = {  # runs: run folders written by another process or edited by hand
        "foreign_run": (1, "is a record of another run"), "foreign_source": (1, "which SOURCE does not hold"),
        "repeat": (1, "repeats"), "locked": (1, f"is in use by another kapao process (pid {os.getpid()})"),
        "garbage": (1, "is not a kapao frame record"), "args_list": (2, "expected a mapping"),
        "args_missing": (2, "no predictions.jsonl there"),
    }
    for k, (code, phrase) in run_cases.items():
        out.append(("runs", f"resume-{k}", ["predict", "--resume", f"{{w}}/runs/{k}", *tiny[:4]], code, phrase))
    return out


CASES = _cases()


# ----------------------------------------------------------------------------------------------
# The planted inputs
def _coco_variant(w: Path, coco_mini: Path, name: str, edit) -> Path:
    gt = json.loads((coco_mini / "person_keypoints.json").read_text())
    edit(gt)
    (w / "ds" / f"{name}.json").write_text(json.dumps(gt))
    path = w / f"{name}.yaml"
    path.write_text(f"base: coco\npath: {w / 'ds'}\n" + "".join(f"{s}: images\n{s}_annotations: {name}.json\n"
                                                                for s in ("train", "val")))
    return path


def _plant_paths(w: Path, coco_mini: Path) -> None:
    shutil.copytree(coco_mini / "images", w / "ds" / "images")
    (w / "elsewhere").mkdir()
    shutil.copy(next((coco_mini / "images").iterdir()), w / "elsewhere" / "y.jpg")
    (w / "ds" / "images" / "outlink").symlink_to(w / "elsewhere")
    for k, name in TRAVERSAL.items():
        _coco_variant(w, coco_mini, f"trav_{k}", lambda g, n=name: g["images"][1].__setitem__("file_name", n))

    def dup(g: dict) -> None:
        g["images"][1]["file_name"] = g["images"][0]["file_name"]
    _coco_variant(w, coco_mini, "trav_dup", dup)
    from kapao.cfg.dataset import load_dataset_config
    from kapao.data.convert import coco_to_yolo

    res = coco_to_yolo(load_dataset_config(_coco_variant(w, coco_mini, "mini", lambda g: None)), w / "yolo")
    (w / "mini.yaml").write_text((w / "mini.yaml").read_text())
    for k, line in (("dotdot", "../../elsewhere/y.jpg"), ("abs", str(w / "elsewhere" / "y.jpg")),
                    ("twin", "../yolo_dotdot/images/train/{first}")):
        shutil.copytree(res.yaml_path.parent, w / f"yolo_{k}", symlinks=True)
        first = sorted((w / f"yolo_{k}" / "images" / "train").iterdir())[0].name
        (w / f"yolo_{k}" / "train.txt").write_text(f"./images/train/{first}\n{line.format(first=first)}\n")
        text = (w / f"yolo_{k}" / "data.yaml").read_text().replace("train: images/train", "train: train.txt")
        (w / f"yolo_{k}" / "data.yaml").write_text(text)


def _plant_yaml_and_runs(w: Path) -> None:
    for k, text in HOSTILE_YAML.items():
        (w / f"y_{k}.yaml").write_bytes(text.encode())
        run = w / f"run_{k}"
        run.mkdir()
        (run / "args.yaml").write_bytes(text.encode())
        (run / "predictions.jsonl").write_text("")
    for k, (text, _) in TRACKER.items():
        (w / f"t_{k}.yaml").write_text(text)


def _plant_runs(w: Path) -> None:
    from kapao.infer.resume import RUN_ARGS

    src = w / "imgs"
    src.mkdir()
    for i in range(3):
        shutil.copy(w / "img.jpg", src / f"{i}.jpg")
    args = {"source": str(src), "weights": str(w / "tiny.pt"), "imgsz": 64, "run": "r1"}
    rec = {"frame": None, "time": None, "poses": []}
    lines = {"foreign_run": [{"source": "0.jpg", "run": "r1"}, {"source": "1.jpg", "run": "r2"}],
             "foreign_source": [{"source": "0.jpg", "run": "r1"}, {"source": "../x.jpg", "run": "r1"}],
             "repeat": [{"source": "0.jpg", "run": "r1"}, {"source": "0.jpg", "run": "r1"}],
             "locked": [{"source": "0.jpg", "run": "r1"}], "garbage": None, "args_list": [], "args_missing": None}
    import yaml

    for k, recs in lines.items():
        d = w / "runs" / k
        d.mkdir(parents=True)
        (d / RUN_ARGS).write_text("- a list\n" if k == "args_list" else yaml.safe_dump(args))
        if k == "garbage":
            (d / "predictions.jsonl").write_text('{"source": "0.jpg", "frame": null, "poses": [], "run": "r1"}\n[1, 2]\n')
        elif recs is not None:
            (d / "predictions.jsonl").write_text("".join(json.dumps({**rec, **r}) + "\n" for r in recs))


def _plant_media(w: Path, test_video: Path) -> None:
    import cv2

    cv2.imwrite(str(w / "img.jpg"), np.full((64, 64, 3), 90, np.uint8))
    names, vnames = w / "names", w / "vnames"
    names.mkdir()
    vnames.mkdir()
    clip = cv2.VideoWriter(str(w / "clip.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 30, (64, 48))
    for i in range(3):
        clip.write(np.full((48, 64, 3), 60 * i, np.uint8))
    clip.release()
    for k, raw in NAMES.items():
        (names / k).mkdir()
        shutil.copy(w / "img.jpg", os.path.join(os.fsencode(names / k), raw))
        if k in ("ff", "newline", "escape", "unicode"):
            (vnames / k).mkdir()
            shutil.copy(w / "clip.mp4", os.path.join(os.fsencode(vnames / k), raw[:-4] + b".mp4"))


def _plant_onnx(w: Path) -> None:
    import onnx

    from kapao.backends.onnx_graph import set_metadata
    from kapao.export import export_onnx
    from kapao.models.network import kapao_n

    good = export_onnx(kapao_n(17), w / "good.onnx", imgsz=64, check=False)
    model = onnx.load(str(good))
    for key, values in ONNX_META.items():
        for i, value in enumerate(values):
            set_metadata(model, {key: value})
            onnx.save(model, str(w / f"onnx_{key}_{i}.onnx"))
            set_metadata(model, {k: p for k, p in _meta(onnx.load(str(good))).items() if k == key})
    bad = onnx.load(str(good))  # valid metadata for K=5 on the K=17 graph: its output has 57 channels, K=5 needs 21
    from kapao.backends.onnx_graph import export_metadata

    set_metadata(bad, export_metadata(kapao_n(5), (64, 64), dynamic=False, half=False, batch=1, opset=17))
    onnx.save(bad, str(w / "onnx_nohead.onnx"))


def _meta(model) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


@pytest.fixture(scope="module")
def planted(tmp_path_factory, coco_mini: Path, test_video: Path) -> Path:
    """{root}/w: every planted input; {root}/cases/<id>: each case's own folder (its working folder)."""
    import torch

    from kapao.models.network import kapao_n
    from kapao.weights.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("hostile")
    w = root / "w"
    w.mkdir()
    torch.manual_seed(0)
    save_checkpoint(w / "tiny.pt", kapao_n(17))
    _plant_media(w, test_video)
    _plant_paths(w, coco_mini)
    _plant_yaml_and_runs(w)
    _plant_runs(w)
    _plant_onnx(w)
    return root


def _listing(root: Path) -> dict[bytes, tuple[int, int]]:
    """Every path under root (as bytes: names need not be text) with its size and mtime."""
    found = {}
    for folder, dirs, files in os.walk(os.fsencode(root)):
        for n in dirs + files:
            p = os.path.join(folder, n)
            st = os.lstat(p)
            found[p] = (st.st_size, st.st_mtime_ns)
    return found


def _grade(code: int, want: int, out: str, phrase: str, touched: list[bytes]) -> str:
    lines = out.strip().splitlines()
    last = lines[-1] if lines else ""
    if code != want or touched or "Traceback" in out:
        return "bad"
    errors = [ln for ln in lines if ln.startswith("Error:")]
    if phrase.startswith("report:"):  # kapao check: its report names the problem, exit 1, no error line
        return "OK" if phrase[7:] in out and not errors else "weak"
    if want != 0 and (len(errors) != 1 or not last.startswith("Error:") or phrase not in last or "a bug?" in last):
        return "weak"
    if want == 0 and phrase not in out:
        return "weak"
    return "OK"


@pytest.mark.parametrize("area, case_id, argv, code, phrase", CASES, ids=[f"{a}-{i}" for a, i, *_ in CASES])
def test_hostile_case(planted: Path, monkeypatch, area: str, case_id: str, argv: list[str], code: int, phrase: str):
    case = planted / "cases" / f"{area}-{case_id}"
    case.mkdir(parents=True)
    monkeypatch.chdir(case)
    monkeypatch.setenv("KAPAO_CACHE_DIR", str(case / "cache"))
    monkeypatch.setenv("KAPAO_WEIGHTS_DIR", str(case / "weights"))
    for a in argv:
        if a.startswith("env:"):
            key, _, value = a[4:].partition("=")
            monkeypatch.setenv(key, value)
    argv = [a.replace("{w}", str(planted / "w")).replace("{t}", str(case)) for a in argv if not a.startswith("env:")]
    before = _listing(planted)
    lock = None
    if case_id == "resume-locked":  # a second writer: this process holds the run folder's lock, as RunLock does
        import fcntl

        lock = os.open(planted / "w" / "runs" / "locked" / ".kapao.lock", os.O_RDWR | os.O_CREAT)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(lock, f"{os.getpid()}\n".encode())
    try:
        res = CliRunner().invoke(cli, argv, catch_exceptions=True)
    finally:
        if lock is not None:
            os.unlink(planted / "w" / "runs" / "locked" / ".kapao.lock")
            os.close(lock)
    out = res.output + (f"\nTraceback: {res.exception!r}" if res.exception and not isinstance(res.exception, SystemExit)
                        else "")
    after = _listing(planted)
    mine = os.fsencode(case)
    resumed = os.fsencode(argv[argv.index("--resume") + 1]) if "--resume" in argv else None
    touched = sorted(p for p in set(before) | set(after) if not p.startswith(mine) and before.get(p) != after.get(p)
                     and p != resumed)  # the folder --resume names: its entry (mtime) changes with its lock file
    grade = _grade(res.exit_code, code, out, phrase, touched)
    if os.environ.get("KAPAO_CAMPAIGN_LOG"):
        with open(os.environ["KAPAO_CAMPAIGN_LOG"], "a", encoding="utf-8") as f:
            f.write(f"{area}\t{grade}\t{case_id}\n")
    assert not touched, touched[:5]
    assert res.exit_code == code, out[-1500:]
    assert grade == "OK", out[-1500:]


def test_the_campaign_has_150_cases_over_every_area():
    areas = [a for a, *_ in CASES]
    assert len(CASES) >= 150 and len({(a, i) for a, i, *_ in CASES}) == len(CASES)
    assert {a: areas.count(a) >= 7 for a in set(areas)} == dict.fromkeys(set(areas), True)
    assert set(areas) == {"paths", "yaml", "names", "tracker", "onnx", "mirror", "runs"}
