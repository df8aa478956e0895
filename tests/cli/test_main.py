"""The `kapao` command group: help, version, error handling, python -m entry point."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from kapao.cli.main import cli
from kapao.version import __version__


def test_help_lists_only_real_commands():
    res = CliRunner().invoke(cli, ["--help"])
    assert res.exit_code == 0
    listed = {line.split()[0] for line in res.output.split("Commands:")[1].strip().splitlines()}
    assert listed == set(cli.commands)
    for name, cmd in cli.commands.items():  # every listed command has a working --help
        sub = CliRunner().invoke(cli, [name, "--help"])
        assert sub.exit_code == 0 and "Usage: " in sub.output, name


def test_version():
    res = CliRunner().invoke(cli, ["--version"])
    assert res.exit_code == 0 and __version__ in res.output


def test_errors_are_one_line_and_verbose_shows_traceback(tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"")
    argv = ["info", "--weights", str(broken)]
    res = CliRunner().invoke(cli, argv)
    assert res.exit_code == 1
    assert res.output.count("\n") == 1 and res.output.startswith("Error: ") and "broken.pt" in res.output
    assert "empty (0 bytes)" in res.output
    res = CliRunner().invoke(cli, ["--verbose", *argv])
    assert res.exit_code != 0 and res.exception is not None and "broken.pt" in str(res.exception)


def test_usage_error_exit_code_2():
    res = CliRunner().invoke(cli, ["info", "--size", "q"])
    assert res.exit_code == 2 and "'q' is not one of" in res.output


# Exit codes: 2 = the command line is wrong (a value malformed, out of range, not finite, contradicting
# another option, hardware this machine lacks, or naming something that does not exist: a file, folder,
# dataset folder, name or run, or an output that exists); 1 = what the options name exists but fails while
# running (files of the wrong kind, corrupt files, invalid annotations, I/O). A --data YAML that is not a
# valid dataset config is a usage error (2) naming --data and the YAML.
# USAGE_ERRORS: (argv, option named in the message, key phrase), all exit 2; {tmp} holds empty/ and file.txt.
USAGE_ERRORS = [
    (["predict", "{tmp}/nope.jpg"], "'[SOURCE]'", "does not exist; give an image, video, folder"),
    (["predict", "{tmp}/empty"], "'[SOURCE]'", "is empty"),
    (["predict", "{tmp}/*.png"], "'[SOURCE]'", "matches no files"),
    (["predict", "{tmp}"], "'[SOURCE]'", "holds no image or video files (1 other files); supported: .jpg"),
    (["predict", "x.jpg", "--imgsz", "100"], "'--imgsz'", "100 is not a positive multiple of 64 (try 128)"),
    (["predict", "x.jpg", "--imgsz", "-64"], "'--imgsz'", "not a positive multiple of 64"),
    (["predict", "x.jpg", "--imgsz", "big"], "'--imgsz'", "is not an integer"),
    (["predict", "x.jpg", "--conf", "1.5"], "'--conf'", "0.0<=x<=1.0"),
    (["predict", "x.jpg", "--iou", "-0.1"], "'--iou'", "0.0<=x<=1.0"),
    (["predict", "x.jpg", "--conf-kp", "high"], "'--conf-kp'", "is not a valid float"),
    (["predict", "x.jpg", "--tolerance", "-1"], "'--tolerance'", "x>=0"),
    (["predict", "x.jpg", "--max-det", "0"], "'--max-det'", "x>=1"),
    (["predict", "x.jpg", "--batch", "0"], "'--batch'", "x>=1"),
    (["predict", "x.jpg", "--line-width", "0"], "'--line-width'", "1<=x<=100"),
    (["predict", "x.jpg", "--scales", "1,0.8", "--flips", "none"], "--flips", "one flip per scale"),
    (["predict", "x.jpg", "--scales", "0,1"], "'--scales'", "expected positive numbers such as 0.8,1,1.2"),
    (["predict", "x.jpg", "--scales", "a,b"], "'--scales'", "expected comma-separated numbers"),
    (["predict", "x.jpg", "--flips", "up"], "'--flips'", "use none or lr per pass"),
    (["predict", "x.jpg", "--tta", "--scales", "1"], "--tta", "give either --tta or --scales/--flips"),
    (["predict", "x.jpg", "--device", "gpu"], "'--device'", "expected cpu, mps, a GPU index (0) or a list"),
    (["predict", "x.jpg", "--weights", "{tmp}/nope.pt"], "'--weights'", "not found: no such file, and not a known "
                                                                         "name (kapao_s_coco"),
    (["predict", "x.jpg", "--weights", "{tmp}/empty"], "'--weights'", "is a folder, not a file"),
    (["val", "--data", "nosuch"], "'--data'", "neither a built-in name (coco, crowdpose) nor an existing YAML"),
    (["val", "--data", "{tmp}/empty"], "'--data'", "neither a built-in name"),
    (["val", "--split", "dev"], "'--split'", "'dev' is not one of 'val', 'test', 'train'"),
    (["val", "--crowdpose", "--data", "coco"], "--crowdpose", "contradicts --data coco"),
    (["val", "--batch", "0"], "'--batch'", "x>=1"),
    (["val", "--workers", "-1"], "'--workers'", "x>=0"),
    (["val", "--imgsz", "96"], "'--imgsz'", "(try 128)"),
    (["val", "--conf-kp-person", "2"], "'--conf-kp-person'", "0.0<=x<=1.0"),
    (["val", "--weights", "nope.pt"], "'--weights'", "not found"),
    (["val", "--device", "0,x"], "'--device'", "expected cpu"),
    (["train", "--data", "nosuch"], "'--data'", "neither a built-in name (coco, crowdpose)"),
    (["train", "--hyp", "{tmp}/missing.yaml"], "'--hyp'", "hyperparameter file not found: {tmp}/missing.yaml "
                                                           "(built-in: default)"),
    (["train", "--hyp-set", "lr0"], "'--hyp-set'", "expected KEY=NUMBER such as lr0=0.02"),
    (["train", "--hyp-set", "lr=0.1"], "'--hyp-set'", "unknown hyperparameter(s) lr; known: lr0, lrf"),
    (["train", "--hyp-set", "fliplr=2"], "'--hyp-set'", "'fliplr' is a probability and must be in [0, 1]"),
    (["train", "--hyp-set", "lr0=nan"], "'--hyp-set'", "'lr0' must be a finite non-negative number"),
    (["train", "--resume", "--project", "{tmp}/runs"], "'--resume'", "no run to resume under {tmp}/runs"),
    (["train", "--resume", "{tmp}/empty"], "'--resume'", "{tmp}/empty: no checkpoint there"),
    (["train", "--epochs", "0"], "'--epochs'", "x>=1"),
    (["train", "--batch", "0"], "'--batch'", "x>=1"),
    (["train", "--workers", "-1"], "'--workers'", "x>=0"),
    (["train", "--patience", "-1"], "'--patience'", "x>=0"),
    (["train", "--imgsz", "100"], "'--imgsz'", "(try 128)"),
    (["train", "--size", "q"], "'--size'", "'q' is not one of 'n', 's', 'm', 'l', 'x'"),
    (["train", "--device", "gpu,0"], "'--device'", "distinct GPU indices such as 0,1"),
    (["train", "--weights", "kapao_q_coco"], "'--weights'", "not a known name"),
    (["export", "--imgsz", "100"], "'--imgsz'", "(try 128)"),
    (["export", "--imgsz", "64,64,64"], "'--imgsz'", "expected 640 or H,W such as 384,640"),
    (["export", "--opset", "12"], "'--opset'", "x>=13"),
    (["export", "--format", "tflite"], "'--format'", "'tflite' is not one of 'onnx', 'torchscript', 'openvino'"),
    (["export", "--batch", "0"], "'--batch'", "x>=1"),
    (["export", "--weights", "nope.pt"], "'--weights'", "not found"),
    (["export", "--device", "gpu"], "'--device'", "expected cpu"),
    (["info", "--size", "q"], "'--size'", "'q' is not one of"),
    (["info", "--kpts", "0"], "'--kpts'", "x>=1"),
    (["info", "--imgsz", "65"], "'--imgsz'", "(try 64)"),
    (["info", "--data", "nosuch"], "'--data'", "neither a built-in name"),
    (["info", "--weights", "{tmp}/nope.pt"], "'--weights'", "not found"),
]

# More cases, (argv, exit code, option or file named, key phrase): {in} holds the inputs built by
# _bad_inputs (a tiny checkpoint, files of the wrong kind, broken dataset YAMLs and annotations) and
# {tmp}/runs earlier results; no case may change any of them.
MORE_CASES = [
    (["predict", "x.jpg", "--conf", "nan"], 2, "'--conf'", "'nan' is not a finite number"),
    (["predict", "x.jpg", "--iou", "inf"], 2, "'--iou'", "0.0<=x<=1.0"),
    (["predict", "x.jpg", "--iou-kp", "nan"], 2, "'--iou-kp'", "is not a finite number"),
    (["predict", "x.jpg", "--conf-kp-person", "nan"], 2, "'--conf-kp-person'", "is not a finite number"),
    (["predict", "x.jpg", "--tolerance", "nan"], 2, "'--tolerance'", "is not a finite number"),
    (["predict", "x.jpg", "--scales", "nan,1"], 2, "'--scales'", "expected positive numbers"),
    (["predict", "x.jpg", "--line-width", "100000"], 2, "'--line-width'", "1<=x<=100"),
    (["predict", "x.jpg", "--imgsz", "100000"], 2, "'--imgsz'", "larger than 8192"),
    (["predict", "x.jpg", "--imgsz", "99968"], 2, "'--imgsz'", "larger than 8192"),
    (["predict", "x.jpg", "--max-det", "-5"], 2, "'--max-det'", "x>=1"),
    (["predict", "x.jpg", "--batch", "-1"], 2, "'--batch'", "x>=1"),
    (["predict", "x.jpg", "--device", "cpu,cpu"], 2, "'--device'", "expected cpu, mps, a GPU index"),
    (["predict", "x.jpg", "--verbose", "--conf", "2"], 2, "'--conf'", "0.0<=x<=1.0"),
    (["predict", "{tmp}/nope/*.jpg"], 2, "'[SOURCE]'", "matches no files"),
    (["predict", "{in}/img.jpg", "--half", "--device", "cpu"], 2, "'--half'", "needs a CUDA device"),
    (["predict", "{in}/img.jpg", "--weights", "{in}/photo.pt", "--device", "cpu"], 1, "photo.pt",
     "is a JPEG image, not a checkpoint"),
    (["predict", "{in}/img.jpg", "--weights", "{in}/trunc.pt", "--device", "cpu"], 1, "trunc.pt",
     "is truncated or corrupt"),
    (["predict", "{in}/img.jpg", "--weights", "{in}/weights.yaml", "--device", "cpu"], 1, "weights.yaml",
     "is a text file"),
    (["val", "--data", "{in}/nodata.yaml"], 2, "'--data'", "not found (val split)"),
    (["val", "--data", "{in}/mini.yaml", "--split", "test"], 2, "'--data'", "has no 'test' split"),
    (["val", "--data", "{in}/mini.yaml", "--half", "--device", "cpu"], 2, "'--half'", "needs a CUDA device"),
    (["val", "--crowdpose", "--data", "{in}/mini.yaml"], 2, "--crowdpose", "contradicts --data"),
    (["val", "--conf", "nan"], 2, "'--conf'", "is not a finite number"),
    (["val", "--tolerance", "nan"], 2, "'--tolerance'", "is not a finite number"),
    (["val", "--max-det", "0"], 2, "'--max-det'", "x>=1"),
    (["val", "--tta", "--flips", "lr"], 2, "--tta", "give either --tta or --scales/--flips"),
    (["val", "--imgsz", "100000"], 2, "'--imgsz'", "larger than 8192"),
    (["val", "--device", "cpu,cpu"], 2, "'--device'", "expected cpu"),
    (["val", "--batch", "0", "--verbose"], 2, "'--batch'", "x>=1"),
    (["val", "--data", "{in}/nan.yaml", "--weights", "{in}/tiny.pt", "--device", "cpu", "--imgsz", "128"], 1,
     "nan.json", "'keypoints' holds NaN or infinite values"),
    (["val", "--data", "{in}/dup.yaml", "--weights", "{in}/tiny.pt", "--device", "cpu", "--imgsz", "128"], 1,
     "dup.json", "appears twice"),
    (["val", "--data", "{in}/strid.yaml", "--weights", "{in}/tiny.pt", "--device", "cpu", "--imgsz", "128"], 1,
     "strid.json", "use one id type"),
    (["val", "--data", "{in}/badsig.yaml"], 2, "badsig.yaml", "'sigmas' must be a list of numbers"),
    (["val", "--data", "{in}/flip.yaml"], 2, "flip.yaml", "'flip_idx' must be a list of integers"),
    (["val", "--data", "{in}/badbase.yaml"], 2, "badbase.yaml", "base: dataset config"),
    (["val", "--data", "{in}/mini.yaml", "--weights", "{in}/photo.pt", "--device", "cpu"], 1, "photo.pt",
     "is a JPEG image"),
    (["train", "--device", "cpu,cpu"], 2, "'--device'", "distinct GPU indices such as 0,1"),
    (["train", "--device", "0,0"], 2, "'--device'", "distinct GPU indices such as 0,1"),
    (["train", "--data", "{in}/nodata.yaml"], 2, "'--data'", "not found (train split)"),
    (["train", "--data", "{in}/valonly.yaml"], 2, "'--data'", "train2017 not found (train split)"),
    (["train", "--resume", "{tmp}/empty", "--batch", "4"], 2, "--batch", "cannot change"),
    (["train", "--resume", "{tmp}/empty", "--imgsz", "640", "--data", "coco"], 2, "--data, --imgsz", "cannot change"),
    (["train", "--resume", "{in}/tiny.pt", "--epochs", "2"], 2, "--epochs 2", "has already completed 3 epochs"),
    (["train", "--resume", "{in}/tiny.pt", "--hyp-set", "mosaic=0.5"], 2, "--hyp-set mosaic",
     "keeps its own hyperparameters except lr0, lrf"),
    (["train", "--resume", "{in}/tiny.pt"], 1, "tiny.pt", "has finished all 3 epochs"),
    (["train", "--resume", "{in}/photo.pt"], 1, "photo.pt", "is a JPEG image, not a checkpoint"),
    (["train", "--resume", "{in}/trunc.pt"], 1, "trunc.pt", "is truncated or corrupt"),
    (["train", "--hyp-set", "lr0=inf"], 2, "'--hyp-set'", "'lr0' must be a finite non-negative number"),
    (["train", "--hyp-set", "=1"], 2, "'--hyp-set'", "expected KEY=NUMBER"),
    (["train", "--imgsz", "100000"], 2, "'--imgsz'", "larger than 8192"),
    (["train", "--seed", "x"], 2, "'--seed'", "is not a valid integer"),
    (["train", "--epochs", "0", "--verbose"], 2, "'--epochs'", "x>=1"),
    (["train", "--data", "{in}/badsig.yaml"], 2, "badsig.yaml", "'sigmas' must be a list of numbers"),
    (["export", "--weights", "{in}/tiny.pt", "-o", "{in}/keep.onnx"], 2, "keep.onnx",
     "already exists; add --exist-ok to overwrite it"),
    (["export", "--weights", "{in}/tiny.pt", "-o", "{in}"], 2, "tiny.onnx", "already exists; add --exist-ok"),
    (["export", "--weights", "{in}/tiny.pt"], 2, "tiny.onnx", "already exists; add --exist-ok"),
    (["export", "--weights", "{in}/tiny.pt", "-o", "{in}/file.txt"], 2, "file.txt", "already exists"),
    (["export", "--weights", "{in}/model.onnx"], 1, "model.onnx", "is an ONNX model, not a checkpoint"),
    (["export", "--weights", "{in}/photo.pt"], 1, "photo.pt", "is a JPEG image, not a checkpoint"),
    (["export", "--weights", "{in}/trunc.pt"], 1, "trunc.pt", "is truncated or corrupt"),
    (["export", "--weights", "{in}/tiny.pt", "--half", "--device", "cpu"], 2, "'--half'", "needs a CUDA device"),
    (["export", "--imgsz", "0"], 2, "'--imgsz'", "not a positive multiple of 64"),
    (["export", "--imgsz", "64,y"], 2, "'--imgsz'", "is not an integer"),
    (["export", "--imgsz", "100000"], 2, "'--imgsz'", "larger than 8192"),
    (["export", "--opset", "abc"], 2, "'--opset'", "is not a valid integer"),
    (["export", "--batch", "0", "--verbose"], 2, "'--batch'", "x>=1"),
    (["info", "--kpts", "5", "--data", "coco"], 2, "--kpts 5", "contradicts --data coco"),
    (["info", "--weights", "{in}/tiny.pt", "--size", "x"], 2, "--size", "--weights already fixes size and keypoints"),
    (["info", "--weights", "{in}/tiny.pt", "--kpts", "5"], 2, "--kpts", "--weights already fixes size"),
    (["info", "--weights", "{in}/tiny.pt", "--data", "coco"], 2, "--data", "--weights already fixes size"),
    (["info", "--weights", "{in}/photo.pt"], 1, "photo.pt", "is a JPEG image, not a checkpoint"),
    (["info", "--weights", "{in}/model.onnx"], 1, "model.onnx", "is an ONNX model"),
    (["info", "--weights", "{in}/trunc.pt"], 1, "trunc.pt", "is truncated or corrupt"),
    (["info", "--data", "{in}/badsig.yaml"], 2, "badsig.yaml", "'sigmas' must be a list of numbers"),
    (["info", "--data", "{in}/nansig.yaml"], 2, "nansig.yaml", "'sigmas' must be finite positive numbers"),
    (["info", "--data", "{in}/flip.yaml"], 2, "flip.yaml", "'flip_idx' must be a list of integers"),
    (["info", "--data", "{in}/badbase.yaml"], 2, "badbase.yaml", "missing.yaml"),
    (["info", "--imgsz", "100000"], 2, "'--imgsz'", "larger than 8192"),
    (["info", "--kpts", "x"], 2, "'--kpts'", "is not a valid integer"),
    (["info", "--kpts", "0", "--verbose"], 2, "'--kpts'", "x>=1"),
    (["track", "{tmp}/nope.mp4"], 2, "'[SOURCE]'", "does not exist"),
    (["track", "x.mp4", "--conf", "nan"], 2, "'--conf'", "is not a finite number"),
    (["track", "x.mp4", "--smooth-cutoff", "nan"], 2, "'--smooth-cutoff'", "is not a finite number"),
    (["track", "x.mp4", "--line-width", "100000"], 2, "'--line-width'", "1<=x<=100"),
    (["track", "x.mp4", "--imgsz", "100000"], 2, "'--imgsz'", "larger than 8192"),
    (["track", "{in}/img.jpg", "--half", "--device", "cpu"], 2, "'--half'", "needs a CUDA device"),
    (["predict", "x.jpg", "--smooth-beta", "nan", "--track"], 2, "'--smooth-beta'", "is not a finite number"),
    (["check", "--data", "nosuch"], 2, "'--data'", "neither a built-in name"),
    (["check", "--data", "{in}/badsig.yaml"], 2, "'--data'", "'sigmas' must be a list of numbers"),
    (["check", "--data", "coco", "--samples", "-1"], 2, "'--samples'", "x>=0"),
    (["check", "--data", "coco", "--split", "dev"], 2, "'--split'", "'dev' is not one of"),
    (["convert", "--data", "{in}/mini.yaml", "--to", "yolo", "--out", "{in}"], 2, "'--out'",
     "exists and is not an empty folder"),
    (["convert", "--data", "{in}/mini.yaml", "--to", "csv", "--out", "{tmp}/new"], 2, "'--to'", "'csv' is not one of"),
    (["convert", "--data", "{in}/flip.yaml", "--to", "yolo", "--out", "{tmp}/new"], 2, "'--data'",
     "'flip_idx' must be a list of integers"),
    (["nosuchverb"], 2, "nosuchverb", "No such command"),
]
BAD_INVOCATIONS = [(a, 2, o, p) for a, o, p in USAGE_ERRORS] + MORE_CASES


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, coco_mini) -> Path:
    """{tmp}: empty/, file.txt, runs/ with an earlier result; {tmp}/in: the inputs of MORE_CASES."""
    import cv2
    import numpy as np
    import torch

    from kapao.models.network import kapao_n
    from kapao.train.run import TrainArgs
    from kapao.weights.checkpoint import save_checkpoint

    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "empty").mkdir()
    (tmp / "file.txt").write_text("x")
    (tmp / "runs" / "predict" / "exp").mkdir(parents=True)
    (tmp / "runs" / "predict" / "exp" / "predictions.json").write_text('[{"image_id": 1}]')
    d = tmp / "in"
    d.mkdir()
    cv2.imwrite(str(d / "img.jpg"), np.full((64, 64, 3), 90, np.uint8))
    (d / "photo.pt").write_bytes((d / "img.jpg").read_bytes())
    (d / "model.onnx").write_bytes(b"\x08\x08\x12\x07pytorch" + bytes(40))
    (d / "weights.yaml").write_text("lr0: 0.01\n")
    for name in ("keep.onnx", "tiny.onnx", "file.txt"):
        (d / name).write_bytes(b"earlier output " + name.encode())
    torch.manual_seed(0)
    model = kapao_n(17)
    extra = {"epoch": 2, "train_args": TrainArgs(epochs=3, data="coco").to_dict(), "optimizer": {"state": {}}}
    save_checkpoint(d / "tiny.pt", model, extra=extra)
    (d / "trunc.pt").write_bytes((d / "tiny.pt").read_bytes()[:50_000])
    _dataset_yamls(d, coco_mini)
    return tmp


def _dataset_yamls(d: Path, coco_mini: Path) -> None:
    """Dataset YAMLs and annotation files, good and broken, in `d`."""
    import json

    splits = f"path: {coco_mini}\ntrain: images\nval: images\ntrain_annotations: person_keypoints.json\n" \
             "val_annotations: person_keypoints.json\n"
    (d / "mini.yaml").write_text(f"base: coco\n{splits}")
    (d / "nodata.yaml").write_text(f"base: coco\npath: {d / 'nowhere'}\n")
    (d / "valonly.yaml").write_text(f"base: coco\npath: {coco_mini}\nval: images\nval_annotations: x.json\n")
    schema = "kpt_names: [a, b]\nflip_idx: [1, 0]\n"
    (d / "badsig.yaml").write_text(f"{splits}{schema}sigmas: [x, 0.1]\n")
    (d / "nansig.yaml").write_text(f"{splits}{schema}sigmas: [.nan, 0.1]\n")
    (d / "flip.yaml").write_text(f"{splits}kpt_names: [a, b]\nflip_idx: 1\n")
    (d / "badbase.yaml").write_text("base: missing.yaml\n")
    gt = json.loads((coco_mini / "person_keypoints.json").read_text())
    edits = {"nan": lambda g: g["annotations"][0]["keypoints"].__setitem__(0, float("nan")),
             "dup": lambda g: g["annotations"][1].__setitem__("id", g["annotations"][0]["id"]),
             "strid": lambda g: g["annotations"][1].__setitem__("id", "x1")}
    for name, edit in edits.items():
        bad = json.loads(json.dumps(gt))
        edit(bad)
        (d / f"{name}.json").write_text(json.dumps(bad))
        (d / f"{name}.yaml").write_text(f"base: coco\npath: {coco_mini}\nval: images\nval_annotations: {d / name}.json\n")


def _snapshot(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("argv, code, named, phrase", BAD_INVOCATIONS,
                         ids=[" ".join(a[:4]).replace("{tmp}/", "").replace("{in}/", "") for a, *_ in BAD_INVOCATIONS])
def test_bad_invocations(bad_inputs, monkeypatch, argv, code, named, phrase):
    """Each case: its exit code, one error line (no traceback) naming the option or file, and nothing that
    existed before (inputs, earlier results) lost or changed."""
    tmp = bad_inputs
    monkeypatch.chdir(tmp)
    monkeypatch.setenv("KAPAO_CACHE_DIR", str(tmp / "cache"))
    monkeypatch.setattr("kapao.runtime.cpu_flags", frozenset)  # a CPU without bf16: --half on the CPU is refused
    before = _snapshot(tmp)
    subst = {"{in}": str(tmp / "in"), "{tmp}": str(tmp)}
    argv = [_fill(a, subst) for a in argv]
    res = CliRunner().invoke(cli, argv)
    last = res.output.strip().splitlines()[-1]
    assert res.exit_code == code, res.output
    assert last.startswith("Error: ") and "Traceback" not in res.output, res.output
    assert _fill(named, subst) in last and _fill(phrase, subst) in last, last
    after = _snapshot(tmp)
    assert {p: after.get(p) for p in before} == before  # nothing lost or overwritten


def _fill(text: str, subst: dict[str, str]) -> str:
    for k, v in subst.items():
        text = text.replace(k, v)
    return text


def test_the_bad_input_table_covers_every_verb():
    verbs = [a[0] for a, *_ in BAD_INVOCATIONS]
    assert len({tuple(a) for a, *_ in BAD_INVOCATIONS}) == len(BAD_INVOCATIONS) >= 100  # distinct cases
    assert {v: verbs.count(v) >= 10 for v in ("predict", "val", "train", "export", "info")} == \
        dict.fromkeys(("predict", "val", "train", "export", "info"), True)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU message")
@pytest.mark.parametrize("command", ["predict", "val", "train", "export"])
def test_missing_gpu_is_a_usage_error(command):
    res = CliRunner().invoke(cli, [command, "--device", "0"])
    assert res.exit_code == 2 and "Invalid value for '--device': this machine has no CUDA GPU; use --device cpu" \
        in res.output


def test_python_m_kapao():
    out = subprocess.run([sys.executable, "-m", "kapao", "--version"], capture_output=True, text=True, check=True)
    assert __version__ in out.stdout


def test_info_weights_shows_training_data_and_metrics(tmp_path):
    from kapao.models.network import kapao_n
    from kapao.weights.checkpoint import save_checkpoint

    path = tmp_path / "best.pt"
    save_checkpoint(path, kapao_n(14), extra={"epoch": 7, "dataset": {"name": "crowdpose"},
                                               "metrics": {"AP": 0.5, "AP50": 0.75}})
    res = CliRunner().invoke(cli, ["info", "--weights", str(path), "--imgsz", "256"])
    assert res.exit_code == 0, res.output
    assert "kapao-n" in res.output and "keypoints (14): left_shoulder" in res.output
    assert "trained on: crowdpose, epoch 7" in res.output and "AP 0.5000, AP50 0.7500" in res.output
    assert f"weights: {path} (kapao checkpoint)" in res.output


def test_verbose_after_the_verb_shows_the_traceback(tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"")
    res = CliRunner().invoke(cli, ["info", "--weights", str(broken), "--verbose"])
    assert res.exit_code != 0 and res.exception is not None and "broken.pt" in str(res.exception)
    res = CliRunner().invoke(cli, ["info", "--weights", str(broken), "--", "--verbose"])  # after --: not the flag
    assert res.exit_code == 2 and "--verbose" in res.output


@pytest.mark.parametrize("error, phrase", [
    (ValueError("odd\nsecond line"), "unexpected ValueError: odd (a bug? rerun with --verbose for the traceback"),
    (MemoryError(), "out of memory: the input is too large for this machine; use a smaller --imgsz or --batch"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried"),
     "out of memory"),
])
def test_unexpected_errors_are_one_line(monkeypatch, error, phrase):
    import kapao.models.network

    def boom(*a, **k):
        raise error

    monkeypatch.setattr(kapao.models.network, "build_model", boom)
    res = CliRunner().invoke(cli, ["info", "--imgsz", "64"])
    assert res.exit_code == 1 and res.output.count("\n") == 1 and "Traceback" not in res.output
    assert res.output.startswith("Error: ") and phrase in res.output
    res = CliRunner().invoke(cli, ["info", "--imgsz", "64", "--verbose"])
    assert res.exception is error  # --verbose: the exception itself, with its traceback


def test_quiet_third_party_sets_env_and_turns_warnings_into_one_log_line(monkeypatch, caplog):
    import warnings

    from kapao.runtime import QUIET_ENV, quiet_third_party

    for key in QUIET_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("YOLO_VERBOSE", "True")  # a user's own choice wins
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    quiet_third_party()
    assert os.environ["OPENCV_FFMPEG_LOGLEVEL"] == "-8" and os.environ["YOLO_VERBOSE"] == "True"
    with caplog.at_level("WARNING", logger="kapao"), warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("no 'sigmas' given", UserWarning, stacklevel=1)
    assert caplog.records[-1].getMessage() == "warning: no 'sigmas' given"
