"""The result type (kapao.poses.Poses): shapes, defaults, device moves, COCO serialisation."""
from __future__ import annotations

import json
import sys

import cv2
import numpy as np
import pytest
import torch

from kapao.errors import KapaoError
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


# ----------------------------------------------------------------------------------------------
# The results object: plot, save, show, tables

def _drawable(k: int = 17) -> Poses:
    from kapao.cfg.dataset import load_dataset_config

    g = torch.Generator().manual_seed(1)
    boxes = torch.tensor([[10.0, 20.0, 120.0, 180.0], [150.0, 30.0, 230.0, 190.0]])
    kpts = torch.cat((torch.rand(2, k, 2, generator=g) * 200 + 10, torch.rand(2, k, 1, generator=g)), -1)
    fused = torch.rand(2, k, generator=g) > 0.5
    img = np.full((200, 250, 3), 90, np.uint8)
    return Poses(boxes, torch.tensor([0.9, 0.8]), kpts, fused=fused, orig_shape=(200, 250), path="x.jpg",
                 schema=load_dataset_config("coco").schema, image=img)


def test_plot_draws_as_the_cli_does():
    from kapao.infer.options import DrawOptions
    from kapao.infer.sinks import MediaSink

    p = _drawable()
    for opts, kw in [(DrawOptions(), {}), (DrawOptions(show_boxes=True, show_scores=True, fused_only=True, line_width=3),
                                           {"boxes": True, "scores": True, "fused_only": True, "line_width": 3})]:
        expected = MediaSink(p.schema, opts, save=False)._draw(p.image, p)
        got = p.plot(**kw)
        assert got.shape == (200, 250, 3) and got.dtype == np.uint8 and np.array_equal(got, expected)
    assert not np.array_equal(p.plot(), p.image) and (p.image == 90).all()  # drawn on a copy
    bare = Poses(p.boxes, p.scores, p.keypoints)
    with pytest.raises(KapaoError, match="carry no keypoint schema"):
        bare.plot(p.image)
    with pytest.raises(KapaoError, match="was not kept; pass it"):
        Poses(p.boxes, p.scores, p.keypoints, schema=p.schema, path="clip.mp4", frame=3).plot()


def test_save_writes_the_plot(tmp_path):
    p = _drawable()
    out = p.save(tmp_path / "sub" / "drawn.png", boxes=True)
    assert out == tmp_path / "sub" / "drawn.png"
    assert np.array_equal(cv2.imread(str(out)), p.plot(boxes=True))  # png: lossless
    # an image file named by `path` is read again when the image was not kept
    cv2.imwrite(str(tmp_path / "x.png"), p.image)
    again = Poses(p.boxes, p.scores, p.keypoints, schema=p.schema, path=str(tmp_path / "x.png"))
    assert np.array_equal(again.plot(), p.plot())


def test_show_without_a_display_is_one_line(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    with pytest.raises(KapaoError, match="no display found .* use poses.save"):
        _drawable().show()


def test_table_rows_and_dataframe(tmp_path, monkeypatch):
    p = _drawable()
    cols = p.table_columns()
    assert cols[:9] == ["path", "frame", "pose", "track_id", "score", "x1", "y1", "x2", "y2"]
    assert cols[9:12] == ["nose_x", "nose_y", "nose_conf"] and len(cols) == 9 + 17 * 3
    rows = p.table_rows()
    assert len(rows) == 2 and rows[1][:4] == ["x.jpg", None, 1, None]
    assert rows[1][9:12] == pytest.approx(p.keypoints[1, 0].tolist())
    pd = pytest.importorskip("pandas")
    df = p.to_df()
    assert list(df.columns) == cols and len(df) == 2 and df["score"].tolist() == pytest.approx([0.9, 0.8])
    text = p.to_csv(tmp_path / "poses.csv")
    back = pd.read_csv(tmp_path / "poses.csv")
    assert text.splitlines()[0].startswith("path,frame,pose") and back["x2"].tolist() == pytest.approx([120.0, 230.0])
    monkeypatch.setitem(sys.modules, "pandas", None)  # as if not installed
    with pytest.raises(ImportError, match=r"^Poses.to_df\(\) needs the 'pandas' package, which is not installed; "
                                          r"pip install 'kapao\[pandas\]'$"):
        p.to_df()
