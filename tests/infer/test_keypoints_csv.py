"""keypoints.csv (kapao.infer.keypoints_csv): written frame by frame, readable at any time, appended on resume."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from kapao.data.sources import Frame
from kapao.infer.keypoints_csv import CsvSink
from kapao.poses import Poses

K = 4
NAMES = ["nose", "neck", "left_hand", "right_hand"]


def poses(n: int, track_ids: list[int] | None, seed: int = 0) -> Poses:
    g = torch.Generator().manual_seed(seed)
    kp = torch.rand(n, K, 3, generator=g) * torch.tensor([640.0, 480.0, 1.0])
    ids = None if track_ids is None else torch.tensor(track_ids, dtype=torch.int64)
    return Poses(torch.rand(n, 4, generator=g) * 100, torch.rand(n, generator=g), kp, track_ids=ids)


def read(path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_csv_rows_per_keypoint_flushed_every_frame(tmp_path):
    image = np.zeros((8, 8, 3), np.uint8)
    path = tmp_path / "keypoints.csv"
    sink = CsvSink(NAMES)
    sink.open(tmp_path)
    assert read(path) == [] and path.read_text().startswith("source,frame,pose,track,keypoint,x,y,confidence")
    frames = [poses(2, [1, 2], 0), poses(3, [1, -1, 3], 1), poses(0, [], 2)]
    for f, p in enumerate(frames):
        sink.add(Frame(image, "/videos/walk.mp4", f), p)
        assert len(read(path)) == sum(len(q) for q in frames[:f + 1]) * K  # readable while the run goes on
    sink.add(Frame(image, "/images/a b.jpg"), poses(1, None, 3))  # not tracked: empty track
    sink.close()
    assert sink.path == path
    rows = read(path)
    assert len(rows) == 6 * K
    r = rows[(2 + 1) * K + 2]  # frame 1, pose 1, keypoint 2
    assert (r["source"], r["frame"], r["pose"], r["track"], r["keypoint"]) == ("walk.mp4", "1", "1", "", "left_hand")
    assert float(r["x"]) == pytest.approx(float(frames[1].keypoints[1, 2, 0]), abs=0.01)
    assert float(r["confidence"]) == pytest.approx(float(frames[1].keypoints[1, 2, 2]), abs=1e-4)
    assert [x["track"] for x in rows[2 * K:5 * K:K]] == ["1", "", "3"]
    assert (rows[-1]["source"], rows[-1]["frame"], rows[-1]["track"]) == ("a b.jpg", "", "")


def test_csv_unwritable_folder_is_one_line_error(tmp_path):
    from kapao.errors import DataError

    with pytest.raises(DataError, match="cannot write .*keypoints.csv"):
        CsvSink(NAMES).open(tmp_path / "missing")


def test_csv_appends_to_a_resumed_run_after_cutting_an_unfinished_line(tmp_path):
    image = np.zeros((8, 8, 3), np.uint8)
    sink = CsvSink(NAMES)
    sink.open(tmp_path)
    sink.add(Frame(image, "v.mp4", 0), poses(1, [1]))
    sink.close()
    with open(tmp_path / "keypoints.csv", "a") as f:
        f.write("v.mp4,1,0,1,no")  # a kill in the middle of a line
    sink = CsvSink(NAMES)
    sink.open(tmp_path)
    sink.add(Frame(image, "v.mp4", 1), poses(2, [1, 2]))
    sink.close()
    rows = read(tmp_path / "keypoints.csv")
    assert [r["frame"] for r in rows] == ["0"] * K + ["1"] * 2 * K  # one header, no broken row
