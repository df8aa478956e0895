"""The README's commands as written: every `kapao …` line of its bash blocks parses (verb, options,
choices, files named exist once the example names are given tiny fixtures), and the dataset commands
(check, convert both ways) run on coco-mini."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from kapao.cli.main import cli

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[str]:
    """`kapao …` lines of the README's ```bash blocks, comments cut (lines with an ellipsis left out)."""
    text = README.read_text(encoding="utf-8")
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = re.split(r"\s{2,}#", line)[0].strip()
            if line.startswith("kapao ") and "…" not in line:
                lines.append(line)
    return lines


def _fixtures(tmp: Path, coco_mini_yaml: Path, coco_mini: Path, test_video: Path) -> dict[str, str]:
    """Example names of the README -> real files: the datasets, a video, a folder, weights files."""
    res = CliRunner().invoke(cli, ["convert", "--data", str(coco_mini_yaml), "--to", "yolo", "--out",
                                   str(tmp / "mydata-yolo")])
    assert res.exit_code == 0, res.output
    for name in ("best.pt", "best.onnx", "runs/train/exp/weights/best.pt"):
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(b"")  # parsing checks that files exist, not what they hold
    (tmp / "runs/train/exp/weights/last.pt").write_bytes(b"")
    (tmp / "mytracker.yaml").write_text("tracker_type: bytetrack\n")
    for name in ("results.json", "ann.json"):
        (tmp / name).write_text("[]")
    return {"mydata.yaml": str(coco_mini_yaml), "mydata-yolo.yaml": str(tmp / "mydata-yolo" / "data.yaml"),
            "video.mp4": str(test_video), "photos/": str(coco_mini / "images"), "archive/": str(coco_mini / "images"),
            "frames/": str(coco_mini / "images"),
            "shots/*.jpg": str(coco_mini / "images" / "*.jpg"), "mydata-coco": str(tmp / "mydata-coco"),
            "mydata-yolo": str(tmp / "mydata-yolo-2"), "datasets/coco": str(tmp / "datasets" / "coco")}


def test_the_readme_has_commands():
    verbs = {shlex.split(c)[1] for c in readme_commands()}
    assert {"predict", "track", "val", "train", "export", "check", "convert", "info", "download"} <= verbs


def test_every_readme_command_parses(tmp_path: Path, coco_mini_yaml: Path, coco_mini: Path, test_video: Path):
    subst = _fixtures(tmp_path, coco_mini_yaml, coco_mini, test_video)
    for line in readme_commands():
        args = [subst.get(a, a) for a in shlex.split(line)[1:]]
        command = cli.commands.get(args[0])
        assert command is not None, f"README: `{line}`: no verb {args[0]!r}"
        try:
            with click.Context(cli, obj={}) as parent:
                command.make_context(args[0], args[1:], parent=parent)
        except click.UsageError as e:  # BadParameter, NoSuchOption, … are UsageErrors
            if "this machine has no CUDA GPU" in e.format_message() and not _has_cuda():
                continue  # a GPU command (--device 0,1,…): refused here, as it must be on a machine without one
            pytest.fail(f"README: `{line}` is refused: {e.format_message()}")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_readme_dataset_commands_run(tmp_path: Path, coco_mini_yaml: Path, coco_mini: Path, test_video: Path):
    subst = _fixtures(tmp_path, coco_mini_yaml, coco_mini, test_video)
    ran = 0
    for line in readme_commands():
        args = [subst.get(a, a) for a in shlex.split(line)[1:]]
        if args[0] not in ("check", "convert"):
            continue
        res = CliRunner().invoke(cli, [*args, *(["--project", str(tmp_path / "runs")] if args[0] == "check" else [])])
        assert res.exit_code == 0, f"README: `{line}`:\n{res.output}"
        ran += 1
    assert ran == 3  # check, convert --to coco, convert --to yolo
