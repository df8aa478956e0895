"""Keypoint-level matching, ROC AUC and calibration (kapao.eval.confidence) and the scripts built on them."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from kapao.cfg.dataset import load_dataset_config
from kapao.eval.confidence import (
    KeypointOutcomes,
    keypoint_similarity,
    match_image,
    match_predictions,
    person_area,
    reliability,
    roc_auc,
)
from kapao.models.network import kapao_n
from kapao.poses import Poses
from kapao.weights.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parents[2]
SIGMAS = load_dataset_config("coco").schema.sigmas


def _coco(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def _gt_poses(anns, jitter=0.0, seed=0, conf=None) -> Poses:
    """Ground-truth persons as predicted poses (keypoints moved by `jitter` px), scores descending."""
    rng = np.random.default_rng(seed)
    kp = torch.tensor([a["keypoints"] for a in anns], dtype=torch.float32).reshape(len(anns), -1, 3)
    kp[..., :2] += torch.from_numpy(rng.standard_normal(kp[..., :2].shape) * jitter).float()
    kp[..., 2] = torch.from_numpy(rng.random(kp.shape[:2])).float() if conf is None else conf
    boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]).reshape(-1, 4)
    fused = torch.from_numpy(rng.random(kp.shape[:2]) < 0.5)
    return Poses(boxes, torch.linspace(0.9, 0.5, len(anns)), kp, fused=fused)


def test_keypoint_similarity_averages_to_pycocotools_oks(coco_mini: Path):
    ann_file = coco_mini / "person_keypoints.json"
    gt = _coco(ann_file)
    img = max(gt.imgs, key=lambda i: len(gt.getAnnIds(imgIds=[i], iscrowd=False)))
    all_anns = gt.loadAnns(gt.getAnnIds(imgIds=[img], catIds=[1]))  # COCOeval's column order
    scored = np.array([not a["iscrowd"] and a["num_keypoints"] > 0 for a in all_anns])
    anns = [a for a, s in zip(all_anns, scored) if s]
    poses = _gt_poses(anns, jitter=8.0, seed=1)
    dts = [{"image_id": img, "category_id": 1, "score": float(s), "keypoints": k.flatten().tolist()}
           for s, k in zip(poses.scores, poses.keypoints)]
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(dts), "keypoints")
        ev.params.kpt_oks_sigmas = np.asarray(SIGMAS)
        ev.params.imgIds = [img]
        ev.evaluate()
    ref = np.asarray(ev.ious[(img, 1)])[:, scored]  # (dets in descending score, scored gts)
    gt_kp = np.array([a["keypoints"] for a in anns], np.float64).reshape(len(anns), -1, 3)
    ks = keypoint_similarity(poses.keypoints[..., :2].numpy(), gt_kp[..., :2],
                             np.array([person_area(a) for a in anns]), SIGMAS)
    vis = gt_kp[..., 2] > 0
    oks = (ks * vis).sum(-1) / vis.sum(-1)
    assert len(anns) >= 3 and 0.05 < np.diag(oks).min() and np.diag(oks).max() < 1.0  # jittered, not perfect
    assert np.allclose(oks, ref, rtol=0, atol=1e-9)


def test_match_image_gt_as_prediction_and_rules(coco_mini: Path):
    gt = _coco(coco_mini / "person_keypoints.json")
    for img in gt.imgs:
        anns = gt.loadAnns(gt.getAnnIds(imgIds=[img]))
        scored = [a for a in anns if not a["iscrowd"] and a["num_keypoints"] > 0]
        if not scored:
            continue
        poses = _gt_poses(scored, seed=img % 1000)
        out = match_image(poses, anns, SIGMAS)
        assert out.pairs == len(scored)  # every person found by its own pose, in score order
        labelled = np.array([a["keypoints"][2::3] for a in scored]) > 0
        assert np.array_equal(out.labelled, labelled)
        assert np.array_equal(out.confidence, poses.keypoints[..., 2].double().numpy())
        assert np.array_equal(out.fused, poses.fused.numpy())
        assert np.allclose(out.similarity[labelled], 1.0) and np.isnan(out.similarity[~labelled]).all()
    # a far-away pose matches nobody; crowd persons and persons without labels are not ground truth
    far = _gt_poses(scored)
    far.keypoints[..., :2] += 5000
    assert match_image(far, anns, SIGMAS).pairs == 0
    crowd = [dict(a, iscrowd=1) for a in scored]
    assert match_image(_gt_poses(scored), crowd, SIGMAS).pairs == 0
    assert match_image(Poses.empty(17), anns, SIGMAS).pairs == 0


def test_match_image_greedy_by_score_one_person_each():
    kp = [10, 10, 2] + [0, 0, 0] * 16
    person = {"keypoints": kp, "bbox": [0, 0, 20, 20], "area": 400.0}
    near, nearer = torch.zeros(1, 17, 3), torch.zeros(1, 17, 3)
    near[0, 0] = torch.tensor([11.0, 10.0, 0.3])
    nearer[0, 0] = torch.tensor([10.0, 10.0, 0.7])
    poses = Poses(torch.zeros(2, 4), torch.tensor([0.9, 0.8]), torch.cat((near, nearer)))
    out = match_image(poses, [person], SIGMAS, threshold=0.1)
    assert out.pairs == 1 and out.confidence[0, 0] == pytest.approx(0.3)  # the higher score wins, not the closer
    assert person_area(person, "crowdpose") == pytest.approx(0.53 * 400) and person_area(person) == 400.0


def test_roc_auc_equals_pairwise_reference_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(30):
        n = int(rng.integers(2, 40))
        scores = rng.choice([0.0, 0.1, 0.5, 0.9, rng.random()], size=n)
        pos = rng.random(n) < 0.4
        if pos.all() or not pos.any():
            continue
        p, q = scores[pos][:, None], scores[~pos][None]
        ref = ((p > q).sum() + 0.5 * (p == q).sum()) / (pos.sum() * (~pos).sum())
        assert roc_auc(scores, pos) == pytest.approx(ref, abs=1e-12)
    assert roc_auc([0.9, 0.8, 0.1], [True, True, False]) == 1.0
    assert roc_auc([0.0, 0.0], [True, False]) == 0.5
    assert math.isnan(roc_auc([0.3], [True]))


def test_reliability_bins_and_ece():
    conf = np.array([0.05, 0.05, 0.95, 0.95, 0.95, 0.95, 1.0, 0.55])
    correct = np.array([False, False, True, True, True, False, True, True])
    r = reliability(conf, correct, bins=10)
    assert r.count.tolist() == [2, 0, 0, 0, 0, 1, 0, 0, 0, 5] and len(r.edges) == 11
    assert r.accuracy[0] == 0 and r.accuracy[9] == pytest.approx(0.8) and math.isnan(r.accuracy[1])
    assert r.confidence[9] == pytest.approx((0.95 * 4 + 1.0) / 5)
    expected = (2 * 0.05 + 1 * 0.45 + 5 * abs(0.8 - 0.96)) / 8
    assert r.ece == pytest.approx(expected)
    assert reliability(np.array([0.8] * 5), np.array([1, 1, 1, 1, 0], bool)).ece == pytest.approx(0.0)
    assert reliability(np.zeros(0), np.zeros(0, bool)).ece == 0.0


def test_match_predictions_concatenates_images(coco_mini: Path):
    gt = _coco(coco_mini / "person_keypoints.json")
    preds = []
    for img in gt.imgs:
        anns = [a for a in gt.loadAnns(gt.getAnnIds(imgIds=[img])) if not a["iscrowd"] and a["num_keypoints"] > 0]
        preds.append((img, _gt_poses(anns, conf=1.0) if anns else Poses.empty(17)))
    out = match_predictions(preds, gt, SIGMAS)
    assert out.pairs == 12  # coco-mini: 14 persons, 12 with labelled keypoints
    assert KeypointOutcomes.concat([], 17).confidence.shape == (0, 17)
    r = reliability(out.confidence[out.labelled], out.similarity[out.labelled] >= 0.5)
    assert r.ece == 0.0 and r.count[-1] == out.labelled.sum()  # perfect keypoints with confidence 1


def _person_model():
    """A random-init size n whose person class wins at every anchor: poses everywhere (regressed
    keypoints random), keypoint-class evidence still present -- enough to exercise the scripts."""
    torch.manual_seed(0)
    model = kapao_n(17)
    head = model.head
    with torch.no_grad():
        for conv in head.m:
            conv.bias.view(head.na, head.no)[:, head.layout.cls.start] += 4.0
    return model


def _load_script(name: str, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))  # as `python scripts/<name>.py` has it: `import _common`
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kp_calibration_script_on_tiny_inputs(coco_mini_yaml: Path, tmp_path: Path, capsys, monkeypatch):
    weights = save_checkpoint(tmp_path / "w.pt", _person_model())
    script = _load_script("kp_calibration", monkeypatch)
    save_dir = script.main(["--data", str(coco_mini_yaml), "--weights", str(weights), "--imgsz", "128",
                            "--batch", "4", "--conf", "0", "--match-oks", "0", "--project", str(tmp_path / "cal"),
                            "--no-progress"])
    assert save_dir == tmp_path / "cal" / "exp"
    summary = json.loads((save_dir / "calibration.json").read_text())
    assert summary["matched_persons"] == 12  # with OKS >= 0 every scored person gets a pose
    assert summary["all"]["keypoints"] == summary["labelled_keypoints"] == \
        summary["fused"]["keypoints"] + summary["unfused"]["keypoints"] > 0
    assert 0.0 <= summary["all"]["ece"] <= 1.0
    png = (save_dir / "reliability.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ECE all" in capsys.readouterr().out


def test_kp_confidence_auc_script_with_weights(coco_mini_yaml: Path, tmp_path: Path, monkeypatch):
    weights = save_checkpoint(tmp_path / "w.pt", _person_model())
    script = _load_script("kp_confidence_auc", monkeypatch)
    result = script.main(["--weights", str(weights), "--data", str(coco_mini_yaml), "--imgsz", "128",
                          "--conf", "0", "--match-oks", "0", "--project", str(tmp_path / "auc")])
    assert result["matched_persons"] == 12 and result["labelled"] + result["unlabelled"] == 12 * 17
    assert 0.0 <= result["auc"] <= 1.0 and 0.0 <= result["auc_old_confidence"] <= 1.0
    assert json.loads((tmp_path / "auc" / "exp" / "auc.json").read_text())["auc"] == result["auc"]
