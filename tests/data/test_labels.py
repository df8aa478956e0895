"""COCO labels on their own: one annotation parsed, JSON checks, the .npz cache round trip and its file places.

Parsing whole datasets (counts on coco-mini, cache hits, images skipped) is tested through the dataset
in tests/data/test_dataset.py.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import kapao.data.labels as kl
from kapao.data.labels import DatasetStats, Labels, cache_paths, load_cached, parse_annotation, validate_coco
from kapao.errors import DataError


def _ann(bbox, kpts, **kw):
    return {"id": 7, "image_id": 1, "category_id": 1, "bbox": bbox, "keypoints": kpts, **kw}


def test_parse_annotation_box_to_xyxy_scaled_and_keypoints_shaped():
    stats = DatasetStats()
    a = _ann([10, 20, 30, 40], [15, 25, 2, 0, 0, 0, 30, 50, 1])
    box, kpts = parse_annotation(a, (200, 100), (2.0, 0.5), 3, Path("a.json"), stats)
    assert box.dtype == np.float32 and box.shape == (4,) and kpts.shape == (3, 3) and kpts.dtype == np.float32
    np.testing.assert_allclose(box, [20, 10, 80, 30])  # x scaled by 2, y by 0.5
    np.testing.assert_allclose(kpts, [[30, 12.5, 2], [0, 0, 0], [60, 25, 1]])
    assert stats == DatasetStats()  # nothing skipped, clipped or dropped


def test_parse_annotation_clips_near_and_drops_far_keypoints_and_counts_them():
    stats = DatasetStats()
    # image 100 x 100: margin is 2 px. (-1, 50) is clipped in; (150, 50) is dropped; an unlabelled one is zeroed
    a = _ann([0, 0, 50, 50], [-1, 50, 2, 150, 50, 2, 7, 8, 0])
    _, kpts = parse_annotation(a, (100, 100), (1.0, 1.0), 3, Path("a.json"), stats)
    assert kpts[0, 0] == 0 and kpts[0, 2] == 2
    assert (kpts[1] == 0).all() and (kpts[2] == 0).all()
    assert (stats.kpts_clipped, stats.kpts_dropped) == (1, 1)


def test_parse_annotation_skips_a_box_outside_the_image():
    stats = DatasetStats()
    assert parse_annotation(_ann([120, 0, 10, 10], [0, 0, 0]), (100, 100), (1.0, 1.0), 1, Path("a.json"), stats) is None
    assert stats.empty_boxes == 1


@pytest.mark.parametrize("a, match", [
    (_ann([0, 0, 5, 5], [1, 2, 2]), r"a\.json: annotation id 7 has 1 keypoints but the dataset schema has K=2"),
    (_ann(None, [1, 2, 2, 3, 4, 2]), r"a\.json: annotation id 7 needs a 'bbox' of 4 numbers"),
])
def test_parse_annotation_bad_rows_name_the_file_and_id(a, match):
    with pytest.raises(DataError, match=match):
        parse_annotation(a, (10, 10), (1.0, 1.0), 2, Path("a.json"), DatasetStats())


@pytest.mark.parametrize("dataset, match", [
    ([], "not a COCO annotation file"),
    ({"images": [{"id": 1}, {"id": 1}], "annotations": []}, "image id 1 appears twice"),
    ({"images": [{"id": 1}], "annotations": [_ann([0, 0, float("nan"), 1], [])]}, "bbox"),
    ({"images": [{"id": 1}], "annotations": [_ann([0, 0, 1, 1], [1, 2])]}, "keypoints"),
])
def test_validate_coco_rejects_with_the_place(dataset, match):
    with pytest.raises(DataError, match="where.json") as e:
        validate_coco(dataset, "where.json")
    assert match in str(e.value)


def test_validate_coco_accepts_a_well_formed_file_and_missing_lists():
    validate_coco({"images": [{"id": 1}], "annotations": [_ann([0, 0, 1, 1], [1, 2, 2], iscrowd=0)]}, "x", 1)
    validate_coco({}, "x")  # no images, no annotations: an empty dataset, checked elsewhere


def _labels() -> Labels:
    return Labels(files=np.array(["a.jpg", "b.jpg"]), image_ids=np.array([3, 4], np.int64),
                  shapes=np.array([[10, 20], [30, 40]], np.int64), apply_exif=np.array([False, True]),
                  offsets=np.array([0, 2, 2], np.int64), boxes=np.arange(8, dtype=np.float32).reshape(2, 4),
                  keypoints=np.arange(12, dtype=np.float32).reshape(2, 2, 3),
                  stats=DatasetStats(images=2, persons=2, negatives=1), skipped=np.array(["c.jpg"]))


def test_labels_instances_slices_per_image_and_copies():
    lab = _labels()
    assert len(lab) == 2
    first, empty = lab.instances(0), lab.instances(1)
    assert first.boxes.shape == (2, 4) and first.keypoints.shape == (2, 2, 3) and empty.boxes.shape == (0, 4)
    first.boxes[:] = -1
    assert (lab.boxes >= 0).all()  # the caller may augment its instances in place


def test_labels_cache_round_trip_and_stale_key(tmp_path):
    lab, path = _labels(), tmp_path / "x.cache"
    lab.save(path, "key-1")
    back = Labels.load(path, "key-1")
    assert back is not None and back.stats == lab.stats
    for f in ("files", "image_ids", "shapes", "apply_exif", "offsets", "boxes", "keypoints", "skipped"):
        np.testing.assert_array_equal(getattr(back, f), getattr(lab, f))
    assert Labels.load(path, "key-2") is None  # another JSON or setup
    assert load_cached([tmp_path / "absent.cache", path], "key-1") is not None
    path.write_bytes(b"not an npz")
    assert Labels.load(path, "key-1") is None


def test_stats_array_round_trip_and_summary():
    s = DatasetStats(images=3, persons=5, box_only=1, crowd_skipped=2)
    assert DatasetStats.from_array(s.to_array()) == s
    line = s.summary()
    assert line.startswith("3 images, 5 persons (1 box-only)") and "2 crowd annotations skipped" in line
    assert "zero-size" not in line  # zero counts stay out of the log line


def test_cache_paths_env_next_to_json_or_user_dir(tmp_path, monkeypatch):
    ann, imgs = tmp_path / "ann.json", tmp_path / "images"
    monkeypatch.setenv("KAPAO_CACHE_DIR", str(tmp_path / "c"))
    (only,) = cache_paths(ann, imgs, "K=17")
    assert only.parent == tmp_path / "c" and only.name.endswith(".cache")
    monkeypatch.delenv("KAPAO_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    near, user = cache_paths(ann, imgs, "K=17")
    assert near.parent == tmp_path and user.parent == tmp_path / "xdg" / "kapao"
    assert cache_paths(ann, imgs, "K=14")[0] != near  # another setup, another file
    monkeypatch.setattr(kl, "_writable_dir", lambda d: False)
    assert cache_paths(ann, imgs, "K=17") == [user]
