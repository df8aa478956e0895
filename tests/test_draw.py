"""Drawing tracked poses: one colour per track id, the same in every frame, and the id written above the box."""
from __future__ import annotations

import numpy as np
import torch

from kapao.cfg.schema import KeypointSchema
from kapao.draw import BOX_COLOR, draw_poses, palette, track_color


def schema3() -> KeypointSchema:
    return KeypointSchema(names=("a", "b", "c"), flip_index=(0, 1, 2), sigmas=(0.05,) * 3, skeleton=((0, 1), (1, 2)))


def test_track_colours_are_stable_distinct_and_label_the_id():
    img = np.zeros((120, 200, 3), np.uint8)
    boxes = np.array([[10, 40, 60, 110], [110, 40, 190, 110]], np.float32)
    kpts = np.array([[[15, 60, 1], [55, 60, 1], [35, 100, 1]], [[115, 60, 1], [185, 60, 1], [150, 100, 1]]], np.float32)
    out = draw_poses(img, boxes, kpts, schema3(), track_ids=torch.tensor([3, -1]), line_width=2, show_boxes=False)
    assert tuple(out[60, 35]) == track_color(3)  # limb a-b of the tracked pose in its track's colour
    assert tuple(out[60, 150]) == palette(2)[0]  # the untracked pose keeps the per-limb colours
    label = (out[20:40, 10:60] == track_color(3)).all(-1) | (out[20:40, 10:60] == 255).all(-1)
    assert label.mean() > 0.3 and (out[20:40, 10:60] == 255).all(-1).any()  # id label: track-coloured box, white text
    assert not out[20:40, 110:190].any()  # no label on the untracked pose
    again = draw_poses(img, boxes[::-1], kpts[::-1], schema3(), track_ids=[-1, 3], line_width=2, show_boxes=False)
    np.testing.assert_array_equal(again, out)  # colour follows the id, not the pose's position in the list
    plain = draw_poses(img, boxes, kpts, schema3(), track_ids=[3, -1], line_width=2, show_boxes=False, show_track_ids=False)
    assert not plain[20:39, 10:60].any() and tuple(plain[60, 35]) == track_color(3)
    assert len({track_color(i) for i in range(1, 50)}) == 49 and track_color(1) != BOX_COLOR
    assert img.sum() == 0
