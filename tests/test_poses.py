"""The result type (kapao.poses.Poses): shapes, defaults, device moves, COCO serialisation."""
from __future__ import annotations

import json

import pytest
import torch

from kapao.poses import Poses


def _poses_from_coco(results, k):
    boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in results)]).reshape(-1, 4)
    return Poses(boxes, torch.tensor([r["score"] for r in results]),
                 torch.tensor([r["keypoints"] for r in results]).reshape(-1, k, 3))


def test_poses_to_coco_round_trip():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(4, 2, generator=g) * 500
    boxes = torch.cat((xy, xy + torch.rand(4, 2, generator=g) * 100 + 1), 1)
    poses = Poses(boxes, torch.rand(4, generator=g), torch.rand(4, 17, 3, generator=g) * 600)
    results = json.loads(json.dumps(poses.to_coco(image_id=42)))
    assert len(results) == 4 and all(r["image_id"] == 42 and r["category_id"] == 1 for r in results)
    assert all(len(r["keypoints"]) == 51 for r in results)
    back = _poses_from_coco(results, 17)
    assert torch.allclose(back.boxes, poses.boxes, atol=0.011)
    assert torch.allclose(back.scores, poses.scores, atol=1e-5)
    assert torch.allclose(back.keypoints, poses.keypoints, atol=1e-3)
    assert Poses.empty(17).to_coco(1) == []


def test_poses_fused_and_track_ids_defaults_and_checks():
    p = Poses(torch.zeros(2, 4), torch.zeros(2), torch.zeros(2, 3, 3))
    assert p.fused.shape == (2, 3) and not p.fused.any() and p.track_ids is None
    q = Poses(p.boxes, p.scores, p.keypoints, fused=torch.ones(2, 3, dtype=torch.bool),
              track_ids=torch.tensor([4, 7]))
    moved = q.to("cpu")
    assert moved.fused.all() and moved.track_ids.tolist() == [4, 7]
    with pytest.raises(ValueError, match="fused"):
        Poses(p.boxes, p.scores, p.keypoints, fused=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="fused"):
        Poses(p.boxes, p.scores, p.keypoints, fused=torch.ones(2, 3))
    with pytest.raises(ValueError, match="track_ids"):
        Poses(p.boxes, p.scores, p.keypoints, track_ids=torch.tensor([1]))
