"""The `kapao` command group: help, version, error handling, python -m entry point."""
from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from kapao import __version__
from kapao.cli import cli


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


# Exit codes: 2 = the command line is wrong (a value malformed, out of range, contradicting another
# option, or naming something that does not exist: a file, folder, name or run); 1 = what the options
# name exists but fails while running (corrupt or unsafe files, unreadable media, divergence, I/O).
# (argv, option named in the message, key phrase); {tmp} is a fresh folder with empty/ and file.txt
BAD_INVOCATIONS = [
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
    (["predict", "x.jpg", "--line-width", "0"], "'--line-width'", "x>=1"),
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
    (["train", "--device", "gpu,0"], "'--device'", "expected cpu"),
    (["train", "--weights", "kapao_q_coco"], "'--weights'", "not a known name"),
    (["export", "--imgsz", "100"], "'--imgsz'", "(try 128)"),
    (["export", "--imgsz", "64,64,64"], "'--imgsz'", "expected 640 or H,W such as 384,640"),
    (["export", "--opset", "12"], "'--opset'", "x>=13"),
    (["export", "--format", "tflite"], "'--format'", "'tflite' is not 'onnx'"),
    (["export", "--batch", "0"], "'--batch'", "x>=1"),
    (["export", "--weights", "nope.pt"], "'--weights'", "not found"),
    (["export", "--device", "gpu"], "'--device'", "expected cpu"),
    (["info", "--size", "q"], "'--size'", "'q' is not one of"),
    (["info", "--kpts", "0"], "'--kpts'", "x>=1"),
    (["info", "--imgsz", "65"], "'--imgsz'", "(try 64)"),
    (["info", "--data", "nosuch"], "'--data'", "neither a built-in name"),
    (["info", "--weights", "{tmp}/nope.pt"], "'--weights'", "not found"),
]


@pytest.mark.parametrize("argv, option, phrase", BAD_INVOCATIONS,
                         ids=[" ".join(a[:3]).replace("{tmp}/", "") for a, _, _ in BAD_INVOCATIONS])
def test_bad_invocations_are_usage_errors(tmp_path, argv, option, phrase):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    res = CliRunner().invoke(cli, argv)
    last = res.output.strip().splitlines()[-1]
    assert res.exit_code == 2, res.output
    assert last.startswith("Error: ") and "Traceback" not in res.output
    assert option in last and phrase.replace("{tmp}", str(tmp_path)) in last, last


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
    from kapao.model import kapao_n
    from kapao.weights import save_checkpoint

    path = tmp_path / "best.pt"
    save_checkpoint(path, kapao_n(14), extra={"epoch": 7, "dataset": {"name": "crowdpose"},
                                               "metrics": {"AP": 0.5, "AP50": 0.75}})
    res = CliRunner().invoke(cli, ["info", "--weights", str(path), "--imgsz", "256"])
    assert res.exit_code == 0, res.output
    assert "kapao-n" in res.output and "keypoints (14): left_shoulder" in res.output
    assert "trained on: crowdpose, epoch 7" in res.output and "AP 0.5000, AP50 0.7500" in res.output
    assert f"weights: {path} (kapao checkpoint)" in res.output
