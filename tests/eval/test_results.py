"""`kapao val --predictions`: a results file evaluated without a model, with its checks; --analyze; --metric pck."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from kapao.cfg.dataset import load_dataset_config
from kapao.cfg.schema import HeadLayout
from kapao.cfg.settings import VAL_SETTINGS
from kapao.cli.main import cli
from kapao.eval.results import load_ground_truth
from kapao.eval.val import make_val_loader, validate
from kapao.infer.predictor import Predictor
from tests.eval.test_val import targets_as_predictions

CONTRACT = {"keypoints", "ap", "per_keypoint", "by_size", "by_visible_keypoints", "by_overlap"}
STEPS = ["baseline", "miss", "swap", "inversion", "jitter", "score", "background_fp", "false_negative"]


def _model_val(cfg_yaml: Path, out: Path, shift: float) -> dict:
    """Model-path val with predictions = targets shifted by `shift` px; predictions.json lands in `out`."""
    cfg = load_dataset_config(cfg_yaml)
    k = cfg.schema.num_keypoints
    loader = make_val_loader(cfg, "val", imgsz=320, batch=2)
    queue = [targets_as_predictions(t, len(m), tuple(im.shape[-2:]), k) for im, t, m in loader]
    for q in queue:
        q[..., HeadLayout(k).kpt] += shift
    predictor = Predictor(lambda x: queue.pop(0), cfg.schema, torch.device("cpu"), VAL_SETTINGS.replace(fuse=False))
    out.mkdir(parents=True, exist_ok=True)
    return validate(predictor, loader, save_dir=out, progress=False).metrics


def _val(*args: str) -> object:
    return CliRunner().invoke(cli, ["val", *args])


@pytest.mark.parametrize("yaml_fixture", ["coco_mini_yaml", "crowdpose_mini_yaml"])
def test_predictions_val_equals_model_val_on_the_same_predictions(request, yaml_fixture: str, tmp_path: Path):
    yaml = request.getfixturevalue(yaml_fixture)
    metrics = _model_val(yaml, tmp_path / "model", shift=3.0)
    assert 0 < metrics["AP"] < 1
    ann = load_dataset_config(yaml).split("val")[1]
    for data in (str(yaml), str(ann)):  # the dataset YAML, or the annotations JSON directly
        res = _val("--predictions", str(tmp_path / "model" / "predictions.json"), "--data", data,
                   "--project", str(tmp_path / "runs"))
        assert res.exit_code == 0, res.output
        saved = Path(res.output.strip().splitlines()[-1].removeprefix("Results saved to "))
        assert json.loads((saved / "metrics.json").read_text()) == metrics
        assert f"AP) @[ IoU=0.50:0.95 | area=   all | maxDets= 20 ] = {metrics['AP']:0.3f}" in res.output
        if "AP_easy" in metrics:
            assert "type=  easy" in res.output


def test_a_json_ground_truth_gives_its_schema_and_protocol(coco_mini: Path, crowdpose_mini: Path):
    coco = load_ground_truth(str(coco_mini / "person_keypoints.json"))
    crowd = load_ground_truth(str(crowdpose_mini / "crowdpose.json"))
    assert (coco.protocol, coco.schema.num_keypoints, coco.schema.flip_index[5]) == ("coco", 17, 6)
    assert (crowd.protocol, crowd.schema.num_keypoints) == ("crowdpose", 14) and coco.image_dir is None


def _bad(coco_mini: Path, tmp_path: Path, edit) -> object:
    ann = coco_mini / "person_keypoints.json"
    a = json.loads(ann.read_text())["annotations"][0]
    r = {"image_id": a["image_id"], "category_id": 1, "keypoints": [float(v) for v in a["keypoints"]], "score": 0.5}
    edit(r)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([r]))  # NaN and Infinity as Python writes them
    return _val("--predictions", str(path), "--data", str(ann), "--project", str(tmp_path / "runs"))


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.update(image_id=123456789), "refers to image_id 123456789, which is not in the ground truth"),
    (lambda r: r.update(keypoints=r["keypoints"][:-3]), "has 48 keypoint values"),
    (lambda r: r["keypoints"].__setitem__(4, math.nan), "keypoints value that is not a finite number"),
    (lambda r: r.update(score=math.inf), "score value that is not a finite number"),
])
def test_bad_results_are_one_line_naming_the_file(coco_mini: Path, tmp_path: Path, edit, message: str):
    res = _bad(coco_mini, tmp_path, edit)
    assert res.exit_code == 1 and message in res.output and "bad.json: result #0" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


def test_predictions_contradicts_model_options(coco_mini: Path, tmp_path: Path):
    (tmp_path / "p.json").write_text("[]")
    res = _val("--predictions", str(tmp_path / "p.json"), "--data", str(coco_mini / "person_keypoints.json"),
               "--imgsz", "320")
    assert res.exit_code == 2 and "--imgsz describe a model run" in res.output
    res = _val("--predictions", str(tmp_path / "p.json"))
    assert res.exit_code == 2 and "--predictions needs --data" in res.output
    missing = tmp_path / "missing.yaml"
    missing.write_text(f"base: coco\npath: {tmp_path / 'nowhere'}\nval: images\nval_annotations: ann.json\n")
    res = _val("--predictions", str(tmp_path / "p.json"), "--data", str(missing))
    assert res.exit_code == 2 and "not found" in res.output and "--data" in res.output


@pytest.mark.slow
def test_analyze_and_pck_write_their_files(coco_mini_yaml: Path, tmp_path: Path):
    _model_val(coco_mini_yaml, tmp_path / "model", shift=3.0)
    res = _val("--predictions", str(tmp_path / "model" / "predictions.json"), "--data", str(coco_mini_yaml),
               "--analyze", "--metric", "pck", "--project", str(tmp_path / "runs"))
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "exp"
    summary = json.loads((run / "analysis.json").read_text())
    assert CONTRACT <= set(summary) and list(summary["ap"]) == STEPS
    assert set(summary["keypoints"]) == {"good", "jitter", "inversion", "swap", "miss"}
    assert summary["per_keypoint"]["nose"]["labelled"] > 0 and 0 < summary["per_keypoint"]["nose"]["mean_ks"] < 1
    for name in ("pr_breakdown_oks50.png", "pr_breakdown_oks75.png", "keypoint_errors.png", "worst_matches.jpg"):
        assert (run / name).stat().st_size > 1000, name
    pck = json.loads((run / "pck.json").read_text())
    assert 0 < pck["PCK"] <= 1 and pck["alpha"] == 0.2
    assert "AP after fixing (cumulative)" in res.output and "PCK@0.2" in res.output


@pytest.mark.slow
def test_model_val_with_analyze_writes_analysis_json(coco_mini_yaml: Path, tmp_path: Path):
    from kapao.models.network import kapao_n
    from kapao.weights.checkpoint import save_checkpoint

    weights = tmp_path / "n.pt"
    save_checkpoint(weights, kapao_n(17), extra={"epoch": 0})
    res = _val("--weights", str(weights), "--data", str(coco_mini_yaml), "--imgsz", "256", "--batch", "2", "--workers", "0",
               "--device", "cpu", "--analyze", "--project", str(tmp_path / "runs"))
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "runs" / "exp" / "analysis.json").read_text())
    predictions = json.loads((tmp_path / "runs" / "exp" / "predictions.json").read_text())
    assert CONTRACT <= set(summary) and summary["persons"]["detections"] <= len(predictions)


def test_predictions_on_yolo_data(coco_mini: Path, tmp_path: Path):
    """A YOLO-pose dataset's ground truth is built from its txt labels (image sizes read from the headers)."""
    from tests.data.test_yolo_labels import write_yolo

    yaml_path = write_yolo(tmp_path / "ds", coco_mini, k=5, ndim=2)
    gt = load_ground_truth(str(yaml_path))
    assert gt.schema.num_keypoints == 5 and gt.image_dir is not None
    results = [{"image_id": a["image_id"], "category_id": 1, "score": 1.0, "keypoints": a["keypoints"]}
               for a in gt.coco.dataset["annotations"] if a["num_keypoints"]]
    (tmp_path / "p.json").write_text(json.dumps(results))
    res = _val("--predictions", str(tmp_path / "p.json"), "--data", str(yaml_path), "--project", str(tmp_path / "runs"))
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "runs" / "exp" / "metrics.json").read_text())["AP"] == pytest.approx(1.0)
