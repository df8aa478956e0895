"""The val verb: dataset inference through the shared Predictor, coordinate mapping, metrics, CLI."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from kapao.cfg.dataset import load_dataset_config
from kapao.cfg.schema import HeadLayout, TargetLayout
from kapao.cfg.settings import VAL_SETTINGS
from kapao.cli.main import cli
from kapao.eval.val import make_val_loader, protocol_for, validate
from kapao.infer.engine import Predictor
from kapao.models.network import kapao_n
from kapao.weights.checkpoint import save_checkpoint
from tests.infer.test_predictor import eager_model

REPO = Path(__file__).resolve().parents[2]


def targets_as_predictions(targets: torch.Tensor, batch: int, hw: tuple[int, int], k: int) -> torch.Tensor:
    """Decoded network output (B, N, no) that reproduces the targets exactly (score 1 each).

    Persons without labelled keypoints are left out: COCO ignores them in the GT, and a prediction
    for one would count as a false positive.
    """
    lay, tl = HeadLayout(k), TargetLayout(k)
    h, w = hw
    n = max(1, max((targets[:, tl.image] == b).sum().item() for b in range(batch)))
    pred = torch.zeros(batch, n, lay.num_outputs)
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    for b in range(batch):
        rows = targets[targets[:, tl.image] == b]
        kp_vis = rows[:, tl.kpt].view(-1, k, 3)[..., 2] > 0
        rows = rows[(rows[:, tl.cls] > 0) | kp_vis.any(1)]
        for i, t in enumerate(rows):
            pred[b, i, lay.box] = t[tl.box] * scale
            pred[b, i, lay.obj] = 1.0
            pred[b, i, lay.cls.start + int(t[tl.cls])] = 1.0
            kp = t[tl.kpt].view(k, 3)[:, :2] * torch.tensor([w, h])
            pred[b, i, lay.kpt] = kp.flatten()
    return pred


@pytest.mark.parametrize("yaml_fixture, protocol", [("coco_mini_yaml", "coco"), ("crowdpose_mini_yaml", "crowdpose")])
def test_perfect_predictions_through_the_val_path_give_ap_1(request, yaml_fixture: str, protocol: str):
    """Targets (letterboxed input pixels) -> postprocess -> original pixels -> evaluation: AP must be 1."""
    cfg = load_dataset_config(request.getfixturevalue(yaml_fixture))
    k = cfg.schema.num_keypoints
    loader = make_val_loader(cfg, "val", imgsz=320, batch=2)
    queue = [targets_as_predictions(t, len(m), tuple(im.shape[-2:]), k) for im, t, m in loader]
    predictor = Predictor(lambda x: queue.pop(0), cfg.schema, torch.device("cpu"), VAL_SETTINGS)
    res = validate(predictor, loader, progress=False)
    assert protocol_for(loader.dataset) == protocol == res.protocol
    assert res.metrics["AP"] == pytest.approx(1.0) and res.metrics["AR"] == pytest.approx(1.0)
    assert res.images == len(loader.dataset)
    if protocol == "crowdpose":
        assert res.metrics["AP_easy"] == -1 and res.metrics["AP_hard"] == -1 and res.metrics["AP_medium"] == pytest.approx(1.0)


def test_shifted_predictions_lower_ap(coco_mini_yaml: Path):
    cfg = load_dataset_config(coco_mini_yaml)
    loader = make_val_loader(cfg, "val", imgsz=320, batch=4)
    aps = []
    for shift in (0.0, 3.0, 8.0):
        queue = [targets_as_predictions(t, len(m), tuple(im.shape[-2:]), 17) for im, t, m in loader]
        for q in queue:
            q[..., HeadLayout(17).kpt] += shift
        predictor = Predictor(lambda x: queue.pop(0), cfg.schema, torch.device("cpu"), VAL_SETTINGS.replace(fuse=False))
        aps.append(validate(predictor, loader, progress=False).metrics["AP"])
    assert aps[0] == pytest.approx(1.0) and 1.0 > aps[1] > aps[2] >= 0.0


def test_val_cli_end_to_end_untrained(coco_mini_yaml: Path, tmp_path: Path):
    weights = tmp_path / "n.pt"
    save_checkpoint(weights, kapao_n(17), extra={"epoch": 0})
    res = CliRunner().invoke(cli, ["val", "--weights", str(weights), "--data", str(coco_mini_yaml), "--imgsz", "256",
                                   "--batch", "2", "--workers", "0", "--device", "cpu", "--project", str(tmp_path / "runs")])
    assert res.exit_code == 0, res.output
    assert "(coco protocol): 4 images" in res.output
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets= 20 ]" in res.output
    assert "ms inference" in res.output
    out = tmp_path / "runs" / "exp"
    assert f"Results saved to {out}" in res.output
    assert isinstance(json.loads((out / "predictions.json").read_text()), list)


def test_val_crowdpose_shorthand(crowdpose_mini: Path, tmp_path: Path, monkeypatch):
    """--crowdpose = built-in crowdpose config, test split; the root comes from $KAPAO_DATASETS."""
    root = tmp_path / "datasets" / "crowdpose"
    root.mkdir(parents=True)
    (root / "images").symlink_to(crowdpose_mini / "images")
    (root / "crowdpose_test.json").symlink_to(crowdpose_mini / "crowdpose.json")
    monkeypatch.setenv("KAPAO_DATASETS", str(tmp_path))
    weights = tmp_path / "n14.pt"
    save_checkpoint(weights, kapao_n(14), extra={"epoch": 0})
    res = CliRunner().invoke(cli, ["val", "--crowdpose", "--weights", str(weights), "--imgsz", "128", "--workers", "0",
                                   "--device", "cpu", "--project", str(tmp_path / "runs")])
    assert res.exit_code == 0, res.output
    assert "crowdpose test (crowdpose protocol): 2 images" in res.output
    assert "type=  easy" in res.output or "easy" in res.output


def test_val_wrong_keypoint_count(coco_mini_yaml: Path, tmp_path: Path):
    weights = tmp_path / "n14.pt"
    save_checkpoint(weights, kapao_n(14), extra={"epoch": 0})
    res = CliRunner().invoke(cli, ["val", "--weights", str(weights), "--data", str(coco_mini_yaml), "--device", "cpu",
                                   "--imgsz", "128", "--project", str(tmp_path)])
    assert res.exit_code == 1 and "14" in res.output and "17" in res.output and "Traceback" not in res.output


def _val(weights: Path, data: Path, tmp_path: Path, *extra: str):
    res = CliRunner().invoke(cli, ["val", "--weights", str(weights), "--data", str(data), "--imgsz", "128", "--batch", "2",
                                   "--workers", "0", "--device", "cpu", "--project", str(tmp_path / "runs"), *extra])
    assert "Traceback" not in res.output
    return res


def test_val_cli_zero_detections(coco_mini_yaml: Path, tmp_path: Path):
    """--conf 1 keeps no pose (scores must exceed it): every metric is 0 and the JSON is an empty list."""
    weights = tmp_path / "n.pt"
    save_checkpoint(weights, kapao_n(17), extra={"epoch": 0})
    res = _val(weights, coco_mini_yaml, tmp_path, "--conf", "1.0")
    assert res.exit_code == 0, res.output
    assert "4 images, 0 poses" in res.output
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets= 20 ] = 0.000" in res.output
    assert json.loads((tmp_path / "runs" / "exp" / "predictions.json").read_text()) == []


def test_val_cli_malformed_annotations_is_one_line(coco_mini: Path, tmp_path: Path):
    data = json.loads((coco_mini / "person_keypoints.json").read_text())
    bad = data["annotations"][3]
    del bad["bbox"]
    ann = tmp_path / "broken.json"
    ann.write_text(json.dumps(data))
    yaml_file = tmp_path / "d.yaml"
    yaml_file.write_text(f"base: coco\npath: {coco_mini}\nval: images\nval_annotations: {ann}\n")
    weights = tmp_path / "n.pt"
    save_checkpoint(weights, kapao_n(17), extra={"epoch": 0})
    res = _val(weights, yaml_file, tmp_path)
    assert res.exit_code == 1 and res.output.count("Error:") == 1
    assert res.output.strip().splitlines()[-1] == f"Error: {ann}: annotation id {bad['id']} has no 'bbox'; fix the annotation"
    ann.write_bytes(b"")
    res = _val(weights, yaml_file, tmp_path)
    assert res.exit_code == 1 and res.output.strip().splitlines()[-1] == f"Error: {ann} is empty (0 bytes); " \
                                                                        "re-download or fix the file"


def test_predictions_are_saved_before_evaluation(coco_mini_yaml: Path, tmp_path: Path, monkeypatch):
    """An evaluation that fails (malformed ground truth, ...) does not lose the inference run."""
    import kapao.eval.val as kv
    from kapao.errors import DataError

    def broken(*a, **k):
        raise DataError("ground truth is broken")

    monkeypatch.setattr(kv, "evaluate", broken)
    cfg = load_dataset_config(coco_mini_yaml)
    predictor = Predictor.from_model(kapao_n(17), torch.device("cpu"), settings=VAL_SETTINGS)
    with pytest.raises(DataError, match="ground truth is broken"):
        validate(predictor, make_val_loader(cfg, "val", 128, 2), save_dir=tmp_path, progress=False)
    assert isinstance(json.loads((tmp_path / "predictions.json").read_text()), list)


def test_a_run_that_fails_before_writing_leaves_no_run_folder(coco_mini_yaml: Path, tmp_path: Path, monkeypatch):
    """Inference interrupted (here: the model fails on the first batch) -> no empty runs/val/expN; a run that
    got as far as predictions.json keeps its folder (previous test)."""
    import kapao.eval.val as kv

    def failing(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(kv, "validate", failing)
    project = tmp_path / "runs"
    with pytest.raises(KeyboardInterrupt):
        kv.run_val(kapao_n(17), load_dataset_config(coco_mini_yaml), imgsz=128, batch=2, project=project, progress=False)
    assert project.is_dir() and list(project.iterdir()) == []  # the folder was made, then removed
    (project / "exp").mkdir()
    (project / "exp" / "keep.txt").write_text("x")
    monkeypatch.setattr(kv, "increment_run_dir", lambda *a, **k: project / "exp")
    with pytest.raises(KeyboardInterrupt):
        kv.run_val(kapao_n(17), load_dataset_config(coco_mini_yaml), imgsz=128, batch=2, project=project, progress=False)
    assert (project / "exp" / "keep.txt").is_file()  # never removes a folder that holds something


# ----------------------------------------------------------------------------------------------
# Many processes (torchrun, CPU/gloo): the metrics of one process, to the last printed digit

def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _run(*args: str, nproc: int = 0, rdzv: tuple[str, ...] = ("--standalone",), wait: bool = True):
    """`python ARGS` alone (nproc 0) or under torchrun with `nproc` processes."""
    run = ["-m", "torch.distributed.run", *rdzv, "--nproc-per-node", str(nproc)] if nproc else []
    cmd = [sys.executable, *run, *args]
    if not wait:
        return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def _table(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if " = " in line or "protocol): " in line or line.endswith(" poses")]


@pytest.mark.slow
@pytest.mark.parametrize("yaml_fixture", ["coco_mini_yaml", "crowdpose_mini_yaml"])
def test_sharded_validate_gives_the_metrics_of_one_process(request, yaml_fixture: str):
    """Ground truth moved by noise (AP between 0 and 1): 2 ranks and 1 process print the same table."""
    yaml = str(request.getfixturevalue(yaml_fixture))
    script = str(REPO / "tests" / "eval" / "sharded_val.py")
    one, two = _run(script, yaml, "val"), _run(script, yaml, "val", nproc=2)
    assert _table(one) == _table(two) and len(_table(one)) > 5
    ap = float(_table(one)[1].rsplit("=", 1)[1])
    assert 0 < ap < 1


@pytest.mark.slow
@pytest.mark.parametrize("yaml_fixture, tta", [("coco_mini_yaml", False), ("coco_mini_yaml", True),
                                               ("crowdpose_mini_yaml", False), ("crowdpose_mini_yaml", True)])
def test_val_cli_on_two_processes_equals_one(request, yaml_fixture: str, tta: bool, tmp_path: Path):
    yaml = request.getfixturevalue(yaml_fixture)
    weights = tmp_path / "n.pt"
    save_checkpoint(weights, eager_model(load_dataset_config(yaml).schema.num_keypoints), extra={"epoch": 0})
    common = ["-m", "kapao", "val", "--weights", str(weights), "--data", str(yaml), "--imgsz", "128", "--batch", "1",
              "--workers", "0", "--device", "cpu", *(["--tta"] if tta else [])]
    one = _run(*common, "--project", str(tmp_path / "one"))
    two = _run(*common, "--project", str(tmp_path / "two"), nproc=2)
    assert _table(one) == _table(two) and two.count("Results saved") == 1
    a, b = (tmp_path / d / "exp" / "predictions.json" for d in ("one", "two"))
    assert a.read_bytes() == b.read_bytes() and len(json.loads(a.read_text())) > 0


@pytest.mark.slow
def test_val_on_two_nodes_on_localhost(coco_mini_yaml: Path, tmp_path: Path):
    weights = tmp_path / "n.pt"
    save_checkpoint(weights, eager_model(), extra={"epoch": 0})
    common = ["-m", "kapao", "val", "--weights", str(weights), "--data", str(coco_mini_yaml), "--imgsz", "128",
              "--batch", "1", "--workers", "0", "--device", "cpu"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [_run(*common, "--project", str(tmp_path / "two"), nproc=1, wait=False,
                  rdzv=("--nnodes", "2", "--node-rank", str(i), "--master-addr", "127.0.0.1", "--master-port", str(port)))
             for i in (0, 1)]
    logs = [n.communicate(timeout=600)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], logs
    one = _run(*common, "--project", str(tmp_path / "one"))
    assert _table(one) == _table(logs[0]) and "Results saved" not in logs[1]
    assert (tmp_path / "one" / "exp" / "predictions.json").read_bytes() == \
        (tmp_path / "two" / "exp" / "predictions.json").read_bytes()
