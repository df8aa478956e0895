"""Data pipeline: label parsing + cache, datasets built in the test whose pixels encode their own
coordinates (so augmented keypoints can be checked against image content), targets, loader, drawing."""
from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import kapao.data.dataset as kd
import kapao.data.labels as kl
from kapao.cfg.dataset import load_dataset_config
from kapao.cfg.schema import DatasetConfig, KeypointSchema, TargetLayout
from kapao.cfg.settings import Hyp
from kapao.data.augment import Instances
from kapao.draw import draw_poses, render_batch
from kapao.errors import ConfigError, DataError

TAGS = (40, 80, 160, 200)  # blue value of each synthetic image (never the pad grey 114)
NEG_TAG = 240
SIZES = ((200, 240), (240, 200), (200, 240), (240, 200))  # (h, w), all <= 255 so R = x and G = y fit


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Keep label caches out of the shared data and the home folder."""
    monkeypatch.setenv("KAPAO_CACHE_DIR", str(tmp_path_factory.mktemp("label-cache")))


def make_schema(k: int) -> KeypointSchema:
    flip = list(range(k))
    for a in range(1, k - 1, 2):  # pairs (1, 2), (3, 4), ...; 0 (and an odd last one) map to themselves
        flip[a], flip[a + 1] = a + 1, a
    return KeypointSchema(names=tuple(f"kp{i}" for i in range(k)), flip_index=tuple(flip), sigmas=(0.05,) * k,
                          skeleton=tuple((i, i + 1) for i in range(k - 1)), kp_bbox=0.05)


def coord_image(h: int, w: int, tag: int) -> np.ndarray:
    """BGR image whose pixel (x, y) is (B, G, R) = (tag, y, x)."""
    img = np.empty((h, w, 3), np.uint8)
    img[..., 0] = tag
    img[..., 1] = np.arange(h)[:, None]
    img[..., 2] = np.arange(w)[None, :]
    return img


def grid_keypoints(h: int, w: int, k: int, persons: int) -> np.ndarray:
    """(persons, K, 3) labelled keypoints on a grid >= 30 px apart; some v=1, some unlabelled (v=0)."""
    n = k * persons
    cols = int(np.ceil(np.sqrt(n * w / h)))
    rows = int(np.ceil(n / cols))
    xs, ys = np.linspace(12, w - 12, cols), np.linspace(12, h - 12, rows)
    pts = np.array([(xs[i % cols], ys[i // cols]) for i in range(n)]).reshape(persons, k, 2)
    v = np.full((persons, k, 1), 2.0)
    v[:, 3::5] = 1.0
    v[:, 6::7] = 0.0
    out = np.concatenate([np.round(pts, 1), v], -1)
    out[out[..., 2] == 0] = 0.0
    return out


def write_coco(path: Path, images: list[dict], anns: list[dict], k: int) -> None:
    cats = [{"id": 1, "name": "person", "keypoints": [f"kp{i}" for i in range(k)], "skeleton": []}]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))


def make_dataset(root: Path, k: int = 17, persons: int = 2, negatives: int = 0) -> tuple[DatasetConfig, dict]:
    """4 coordinate-encoded PNGs with `persons` people each (+ `negatives` images without people).

    Returns the config and {tag: (persons, K, 3) keypoints in original pixels}.
    """
    (root / "images").mkdir(parents=True)
    images, anns, sources = [], [], {}
    for i, ((h, w), tag) in enumerate(zip(SIZES, TAGS)):
        cv2.imwrite(str(root / "images" / f"im{i}.png"), coord_image(h, w, tag))
        images.append({"id": i + 1, "file_name": f"im{i}.png", "height": h, "width": w})
        kpts = grid_keypoints(h, w, k, persons)
        sources[tag] = kpts
        for p in range(persons):
            lab = kpts[p][kpts[p, :, 2] > 0]
            x1, y1 = (lab[:, :2].min(0) - 6).clip(0)
            x2, y2 = np.minimum(lab[:, :2].max(0) + 6, (w, h))
            anns.append({"id": 100 * (i + 1) + p, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                         "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                         "keypoints": kpts[p].reshape(-1).tolist(), "num_keypoints": int(len(lab))})
    for j in range(negatives):
        cv2.imwrite(str(root / "images" / f"neg{j}.png"), coord_image(180, 220, NEG_TAG))
        images.append({"id": 1000 + j, "file_name": f"neg{j}.png", "height": 180, "width": 220})
    ann = root / "ann.json"
    write_coco(ann, images, anns, k)
    return dataset_config(root, ann, make_schema(k)), sources


def dataset_config(root: Path, ann: Path, schema: KeypointSchema) -> DatasetConfig:
    return DatasetConfig(name=root.name, root=root, images={"train": root / "images", "val": root / "images"},
                         annotations={"train": ann, "val": ann}, schema=schema, source="test")


def check_content(image: torch.Tensor, targets: torch.Tensor, flipped: bool, sources: dict,
                  flip_index: tuple[int, ...], tol: float) -> tuple[int, int]:
    """Every visible pose keypoint must sit on pixels that decode to the same keypoint of the source.

    Returns (checked, ambiguous): ambiguous keypoints sit on a seam between tiles (blue not a tag).
    """
    rgb = image.permute(1, 2, 0).numpy().astype(np.float64)
    h, w = rgb.shape[:2]
    k = len(flip_index)
    checked = ambiguous = 0
    for row in targets[targets[:, TargetLayout.cls] == 0].numpy():
        kp = row[TargetLayout(k).kpt].reshape(k, 3)
        for j in np.nonzero(kp[:, 2] > 0)[0]:
            x, y = kp[j, 0] * w, kp[j, 1] * h
            assert 0 <= x < w and 0 <= y < h, "a visible keypoint lies outside the image"
            r, g, b = rgb[int(y), int(x)]
            if int(b) not in sources:
                ambiguous += 1
                continue
            src = sources[int(b)]
            d = np.hypot(src[..., 0] - (r + 0.5), src[..., 1] - (g + 0.5))
            d[src[..., 2] <= 0] = np.inf
            p, ks = np.unravel_index(np.argmin(d), d.shape)
            expected = flip_index[j] if flipped else j
            assert d[p, ks] < tol, f"keypoint {j} decodes {d[p, ks]:.1f} px away from any labelled keypoint"
            assert ks == expected, f"keypoint slot {j} shows keypoint {ks}, expected {expected}"
            checked += 1
    return checked, ambiguous


# ----------------------------------------------------------------------------------------------
# Parsing real data
def test_coco_mini_counts(coco_mini_yaml):
    ds = kd.PoseDataset(load_dataset_config(coco_mini_yaml), "train", 256)
    s = ds.stats
    assert (s.images, s.persons, s.box_only, s.negatives, s.missing, s.corrupt) == (4, 14, 2, 0, 0, 0)
    assert len(ds) == 4 and sorted(ds.image_ids) == sorted(ds.coco.getImgIds())
    assert len(ds.coco.getAnnIds()) == 14


def test_crowdpose_mini_counts(crowdpose_mini_yaml):
    ds = kd.PoseDataset(load_dataset_config(crowdpose_mini_yaml), "test", 256)
    assert (ds.stats.images, ds.stats.persons) == (2, 5)
    _, targets, _ = ds[0]
    assert targets.shape[1] == TargetLayout(14).width


def test_stats_line_is_logged_once_per_start(coco_mini_yaml, caplog):
    cfg = load_dataset_config(coco_mini_yaml)
    with caplog.at_level("INFO", logger="kapao.data.dataset"):
        kd.PoseDataset(cfg, "val", 256)
    lines = [r.getMessage() for r in caplog.records if r.name == "kapao.data.dataset"]
    assert len(lines) == 1 and "4 images, 14 persons (2 box-only)" in lines[0]


# ----------------------------------------------------------------------------------------------
# Cache
def test_second_start_hits_the_cache(coco_mini_yaml, monkeypatch):
    cfg = load_dataset_config(coco_mini_yaml)
    first = kd.PoseDataset(cfg, "train", 256)

    def boom(*a, **kw):
        raise AssertionError("parse_annotations called although a valid cache exists")

    monkeypatch.setattr(kl, "parse_annotations", boom)
    second = kd.PoseDataset(cfg, "train", 256)
    assert second.stats == first.stats and second.image_ids == first.image_ids
    assert second._coco is None and len(second.coco.anns) == 14  # COCO object still available, lazily
    t1, t2 = first[2][1], second[2][1]
    assert torch.equal(t1, t2)


def test_cache_invalidated_by_json_change(tmp_path, monkeypatch):
    monkeypatch.delenv("KAPAO_CACHE_DIR")
    cfg, _ = make_dataset(tmp_path / "d", k=5)
    calls = []
    real = kl.parse_annotations
    monkeypatch.setattr(kl, "parse_annotations", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    kd.PoseDataset(cfg, "val", 256)
    kd.PoseDataset(cfg, "val", 256)
    assert len(calls) == 1
    assert list((tmp_path / "d").glob("ann.json.*.cache")), "cache should sit next to a writable JSON"
    ann = cfg.annotations["val"]
    data = json.loads(ann.read_text())
    data["annotations"] = data["annotations"][:3]
    ann.write_text(json.dumps(data))
    ds = kd.PoseDataset(cfg, "val", 256)
    assert len(calls) == 2 and ds.stats.persons == 3
    cv2.imwrite(str(tmp_path / "d" / "images" / "new.png"), coord_image(10, 10, 1))  # image list changed
    kd.PoseDataset(cfg, "val", 256)
    assert len(calls) == 3
    # same size, same mtime, other content (a keypoint moved): the content digest still notices
    st = ann.stat()
    text = ann.read_text()
    edited = text.replace('"iscrowd": 0', '"iscrowd": 1', 1)
    assert edited != text and len(edited) == len(text)
    ann.write_text(edited)
    os.utime(ann, ns=(st.st_atime_ns, st.st_mtime_ns))
    ds = kd.PoseDataset(cfg, "val", 256)
    assert len(calls) == 4 and ds.stats.persons == 3


def test_read_only_folder_caches_in_user_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("KAPAO_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cfg, _ = make_dataset(tmp_path / "d", k=3)
    os.chmod(tmp_path / "d", 0o555)
    try:
        kd.PoseDataset(cfg, "val", 256)
    finally:
        os.chmod(tmp_path / "d", 0o755)
    assert not list((tmp_path / "d").glob("*.cache"))
    cached = list((tmp_path / "xdg" / "kapao").glob("*.cache"))
    assert len(cached) == 1
    with np.load(cached[0], allow_pickle=False) as z:  # plain arrays, no pickle
        assert z["keypoints"].shape == (8, 3, 3)


# ----------------------------------------------------------------------------------------------
# Parsing rules on built datasets
def test_custom_k_rules(tmp_path):
    """Crowd skipped only in training, zero-size boxes skipped, slightly-outside keypoints clipped,
    far-outside ones dropped, negatives kept, box-only persons kept."""
    cfg, _ = make_dataset(tmp_path / "d", k=21, negatives=1)
    ann = cfg.annotations["train"]
    data = json.loads(ann.read_text())
    a0 = data["annotations"][0]
    kp = np.array(a0["keypoints"], float).reshape(21, 3)
    kp[0] = (240 + 2, 50, 2)  # 2 px right of a 240-wide image: clipped
    kp[1] = (-100, 50, 2)  # far outside: dropped
    a0["keypoints"] = kp.reshape(-1).tolist()
    extra = [dict(a0, id=9001, iscrowd=1), dict(a0, id=9002, bbox=[10, 10, 0, 30]),
             dict(a0, id=9003, keypoints=[0] * 63, bbox=[5, 5, 20, 20])]
    data["annotations"] += extra
    ann.write_text(json.dumps(data))
    train = kd.PoseDataset(cfg, "train", 256)
    s = train.stats
    assert (s.images, s.negatives, s.persons, s.box_only) == (5, 1, 9, 1)
    assert (s.crowd_skipped, s.empty_boxes, s.kpts_clipped, s.kpts_dropped) == (1, 1, 1, 1)
    lab = train.labels.instances(0)
    assert lab.keypoints[0, 0, 0] < 240 and lab.keypoints[0, 0, 0] > 239 and lab.keypoints[0, 0, 2] == 2
    assert lab.keypoints[0, 1].tolist() == [0, 0, 0]
    val = kd.PoseDataset(cfg, "val", 256)
    assert val.stats.persons == 10 and val.stats.crowd_skipped == 0
    neg = train.image_ids.index(1000)
    image, targets, _ = train[neg]
    assert targets.shape == (0, TargetLayout(21).width) and image.shape == (3, 256, 256)


def test_keypoint_count_mismatch_names_annotation(tmp_path):
    cfg, _ = make_dataset(tmp_path / "d", k=4)
    data = json.loads(cfg.annotations["val"].read_text())
    data["annotations"][2]["keypoints"] = [1, 1, 2] * 5
    cfg.annotations["val"].write_text(json.dumps(data))
    with pytest.raises(DataError, match=f"annotation id {data['annotations'][2]['id']} has 5 keypoints.*K=4"):
        kd.PoseDataset(cfg, "val", 256)


def test_missing_and_corrupt_images_are_skipped_and_counted(tmp_path, caplog):
    """Missing, garbage, truncated JPEG and truncated PNG files: skipped, counted, one log line."""
    cfg, _ = make_dataset(tmp_path / "d", k=5)
    img_dir, ann = cfg.images["val"], cfg.annotations["val"]
    (img_dir / "garbage.jpg").write_bytes(b"this is not an image")
    good = cv2.imencode(".jpg", coord_image(64, 64, 10))[1].tobytes()
    (img_dir / "truncated.jpg").write_bytes(good[: len(good) // 2])
    png = cv2.imencode(".png", np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))[1].tobytes()
    (img_dir / "truncated.png").write_bytes(png[: len(png) // 2])  # its header is intact
    data = json.loads(ann.read_text())
    names = ("missing.jpg", "garbage.jpg", "truncated.jpg", "truncated.png")
    for n, name in enumerate(names):
        data["images"].append({"id": 500 + n, "file_name": name, "height": 64, "width": 64})
        data["annotations"].append({"id": 600 + n, "image_id": 500 + n, "category_id": 1, "iscrowd": 0,
                                    "bbox": [1, 1, 20, 20], "keypoints": [0] * 15})
    ann.write_text(json.dumps(data))
    with caplog.at_level("INFO", logger="kapao"):
        ds = kd.PoseDataset(cfg, "val", 256)
    assert (ds.stats.images, ds.stats.missing, ds.stats.corrupt, ds.stats.persons) == (4, 1, 3, 8)
    assert sorted(ds.labels.skipped.tolist()) == sorted(names)
    assert all(500 > i for i in ds.image_ids)
    lines = [r.getMessage() for r in caplog.records if r.name == "kapao.data.dataset"]
    assert len(lines) == 1 and "1 missing + 3 corrupt images skipped" in lines[0]  # reported once, not per file


def test_image_that_breaks_after_the_check_becomes_an_empty_negative(tmp_path, monkeypatch, caplog):
    """A file that passed the start-up check but no longer decodes (replaced, disk error) never stops a
    run: the item is a grey image without targets, with one warning naming the file."""
    cfg, _ = make_dataset(tmp_path / "d", k=3)
    ds = kd.PoseDataset(cfg, "train", 128)
    broken = ds.files.index(cfg.images["train"] / "im1.png")
    (cfg.images["train"] / "im1.png").write_bytes(b"overwritten")
    with caplog.at_level("WARNING", logger="kapao"):
        for _ in range(2):
            image, targets, meta = ds[broken]
    assert targets.shape[0] == 0 and image.shape == (3, 128, 128) and meta["image_id"] == 2
    assert (image == 114).all()
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "im1.png" in warned[0] and "empty grey image" in warned[0]
    assert ds[ds.files.index(cfg.images["train"] / "im0.png")][1].shape[0] > 0  # the others are untouched


def test_no_usable_images_is_a_data_error(tmp_path):
    (tmp_path / "images").mkdir()
    ann = tmp_path / "a.json"
    write_coco(ann, [{"id": 1, "file_name": "nope.jpg", "height": 10, "width": 10}], [], 3)
    with pytest.raises(DataError, match="no usable images"):
        kd.PoseDataset(dataset_config(tmp_path, ann, make_schema(3)), "val", 256)


def test_exif_rotated_image_follows_the_json_size(tmp_path):
    """If the JSON's width/height are those of the raw pixels, labels were made on them: no rotation."""
    from PIL import Image

    (tmp_path / "images").mkdir()
    for name in ("a.jpg", "b.jpg"):
        pil = Image.fromarray(np.zeros((30, 40, 3), np.uint8))
        exif = pil.getexif()
        exif[0x0112] = 6
        pil.save(tmp_path / "images" / name, exif=exif)
    ann = tmp_path / "a.json"
    write_coco(ann, [{"id": 1, "file_name": "a.jpg", "height": 40, "width": 30},
                     {"id": 2, "file_name": "b.jpg", "height": 30, "width": 40}], [], 3)
    ds = kd.PoseDataset(dataset_config(tmp_path, ann, make_schema(3)), "val", 256)
    assert ds.labels.apply_exif.tolist() == [True, False]
    assert ds.labels.shapes.tolist() == [[40, 30], [30, 40]] and ds.stats.size_mismatch == 0
    assert [ds[i][2]["orig_shape"] for i in range(2)] == [(40, 30), (30, 40)]


# ----------------------------------------------------------------------------------------------
# Augmented samples against image content
STRICT_HYP = Hyp(hsv_h=0, hsv_s=0, hsv_v=0, degrees=10, shear=4, perspective=0.0002, translate=0.1, scale=0.5)


@pytest.mark.parametrize("k", [21, 14])
def test_mosaic_affine_flip_keep_keypoints_on_content(tmp_path, k):
    cfg, sources = make_dataset(tmp_path / "d", k=k, negatives=1)
    ds = kd.PoseDataset(cfg, "train", 256, hyp=STRICT_HYP, augment=True)
    ds.pixel_noise = None  # blur would blend the coordinate code at tile seams
    ds.reseed(1)
    checked = ambiguous = flips = 0
    for i in range(12):
        image, targets, meta = ds[i % len(ds)]
        assert meta["mosaic"] and image.shape == (3, 256, 256)
        c, a = check_content(image, targets, meta["flipped"], sources, ds.schema.flip_index, tol=3.0)
        checked, ambiguous, flips = checked + c, ambiguous + a, flips + meta["flipped"]
    assert checked > 150 and ambiguous <= 0.03 * checked
    assert 0 < flips < 12


def test_default_hyp_keeps_keypoint_identity(tmp_path):
    """Default gains (scale x U[0.1, 1.9]): coarser, but every keypoint still shows itself."""
    cfg, sources = make_dataset(tmp_path / "d", k=17)
    ds = kd.PoseDataset(cfg, "train", 256, hyp=Hyp(hsv_h=0, hsv_s=0, hsv_v=0), augment=True)
    ds.pixel_noise = None
    ds.reseed(2)
    checked = ambiguous = 0
    for i in range(16):
        image, targets, meta = ds[i % len(ds)]
        c, a = check_content(image, targets, meta["flipped"], sources, ds.schema.flip_index, tol=14.0)
        checked, ambiguous = checked + c, ambiguous + a
    assert checked > 100 and ambiguous <= 0.05 * checked


def test_flip_moves_left_content_to_right_slot(tmp_path):
    cfg, sources = make_dataset(tmp_path / "d", k=7)
    hyp = Hyp(hsv_h=0, hsv_s=0, hsv_v=0, mosaic=0.0, fliplr=1.0, translate=0, scale=0)
    ds = kd.PoseDataset(cfg, "train", 256, hyp=hyp, augment=True)
    ds.pixel_noise = None
    for i in range(len(ds)):
        image, targets, meta = ds[i]
        assert meta["flipped"] and not meta["mosaic"]
        checked, ambiguous = check_content(image, targets, True, sources, ds.schema.flip_index, tol=1.5)
        assert checked == 2 * 6 and ambiguous == 0  # 7 keypoints, 1 unlabelled (v=0), 2 persons
    # a check that would catch a missing swap: without flip_index, slot 1 would show keypoint 1
    with pytest.raises(AssertionError, match="expected"):
        check_content(image, targets, False, sources, ds.schema.flip_index, tol=1.5)


def test_non_mosaic_affine_path(tmp_path):
    cfg, sources = make_dataset(tmp_path / "d", k=9)
    ds = kd.PoseDataset(cfg, "train", 256, hyp=Hyp(hsv_h=0, hsv_s=0, hsv_v=0, mosaic=0.0, degrees=15, scale=0.4),
                        augment=True)
    ds.pixel_noise = None
    ds.reseed(5)
    total = 0
    for i in range(8):
        image, targets, meta = ds[i % len(ds)]
        assert not meta["mosaic"] and meta["ratio"] is None
        total += check_content(image, targets, meta["flipped"], sources, ds.schema.flip_index, tol=3.0)[0]
    assert total > 40


def test_keypoints_pushed_out_become_invisible(tmp_path):
    """Large translation: keypoints outside the input get v = 0, x = y = 0, and no keypoint object."""
    cfg, _ = make_dataset(tmp_path / "d", k=6)
    ds = kd.PoseDataset(cfg, "train", 256, hyp=Hyp(mosaic=0.0, translate=0.45, scale=0.0, fliplr=0.0), augment=True)
    ds.reseed(0)
    layout = TargetLayout(6)
    hidden = 0
    for i in range(12):
        _, targets, _ = ds[i % len(ds)]
        kp = targets[targets[:, 1] == 0][:, layout.kpt].reshape(-1, 6, 3)
        vis = kp[..., 2] > 0
        assert ((kp[..., :2] >= 0) & (kp[..., :2] < 1))[vis].all()
        assert (kp[~vis] == 0).all()
        hidden += int((~vis).sum())
        assert int((targets[:, 1] > 0).sum()) >= int(vis.sum())
    assert hidden > 12 * 2  # more than the unlabelled ones alone (1 per person here)


# ----------------------------------------------------------------------------------------------
# Targets
def test_build_targets_layout():
    schema = make_schema(3)
    kpts = np.array([[[10, 20, 2], [0, 0, 0], [30, 40, 1]], [[50, 60, 2], [70, 80, 2], [0, 0, 0]]], np.float32)
    inst = Instances(np.array([[0, 0, 100, 50], [20, 20, 60, 100]], np.float32), kpts, np.array([True, False]))
    t = kd.encode_targets(inst, (200, 100), schema)  # h=200, w=100
    layout = TargetLayout(3)
    assert t.shape == (1 + 4, layout.width)
    pose = t[t[:, 1] == 0]
    np.testing.assert_allclose(pose[0, layout.box], [0.5, 0.125, 1.0, 0.25])
    np.testing.assert_allclose(pose[0, layout.kpt], [0.1, 0.1, 2, 0, 0, 0, 0.3, 0.2, 1])
    objs = t[t[:, 1] > 0]  # keypoint objects come from the dropped person too
    assert objs[:, 1].tolist() == [1, 3, 1, 2]
    side = 0.05 * 200
    np.testing.assert_allclose(objs[:, 4] * 100, side)
    np.testing.assert_allclose(objs[:, 5] * 200, side)
    np.testing.assert_allclose(objs[:, 2:4], [[0.1, 0.1], [0.3, 0.2], [0.5, 0.3], [0.7, 0.4]])
    assert (objs[:, layout.kpt] == 0).all() and (t[:, 0] == 0).all()


def test_keypoint_objects_match_pose_keypoints(coco_mini_yaml):
    ds = kd.PoseDataset(load_dataset_config(coco_mini_yaml), "val", 320)
    layout, k = TargetLayout(17), 17
    for i in range(len(ds)):
        image, t, _ = ds[i]
        h, w = image.shape[1:]
        kp = t[t[:, 1] == 0][:, layout.kpt].reshape(-1, k, 3)
        objs = t[t[:, 1] > 0]
        vis = kp[..., 2] > 0
        assert len(objs) == int(vis.sum())
        np.testing.assert_allclose(objs[:, 4] * w, 0.05 * max(h, w), rtol=1e-5)
        np.testing.assert_allclose(objs[:, 5] * h, 0.05 * max(h, w), rtol=1e-5)
        person, kid = torch.nonzero(vis, as_tuple=True)
        assert objs[:, 1].long().tolist() == (kid + 1).tolist()
        torch.testing.assert_close(objs[:, 2:4], kp[person, kid, :2])


@pytest.mark.parametrize("rect", [False, True])
def test_letterbox_meta_maps_back_to_the_json(coco_mini_yaml, rect):
    ds = kd.PoseDataset(load_dataset_config(coco_mini_yaml), "val", 320, rect=rect, batch_size=2)
    coco = ds.coco
    for i in range(len(ds)):
        image, t, meta = ds[i]
        h, w = image.shape[1:]
        (rw, rh), (pw, ph) = meta["ratio"], meta["pad"]
        if rect:
            assert (h, w) == tuple(ds.batch_shapes[i // 2]) and h % 64 == 0 and w % 64 == 0
        else:
            assert (h, w) == (320, 320)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=meta["image_id"]))
        pose = t[t[:, 1] == 0].numpy()
        assert len(pose) == len(anns)
        for row, a in zip(pose, anns):
            cx, cy, bw, bh = row[2:6] * (w, h, w, h)
            x1, y1 = ((cx - bw / 2) - pw) / rw, ((cy - bh / 2) - ph) / rh
            np.testing.assert_allclose([x1, y1, bw / rw, bh / rh], a["bbox"], atol=0.02)
            kp = row[6:].reshape(17, 3)
            ref = np.array(a["keypoints"], float).reshape(17, 3)
            vis = ref[:, 2] > 0
            np.testing.assert_array_equal(kp[:, 2], ref[:, 2])
            np.testing.assert_allclose((kp[vis, 0] * w - pw) / rw, ref[vis, 0], atol=0.02)
            np.testing.assert_allclose((kp[vis, 1] * h - ph) / rh, ref[vis, 1], atol=0.02)


def test_rect_batch_shapes():
    shapes = np.array([[100, 200], [300, 100], [100, 100], [150, 200], [200, 100]])  # (h, w)
    order, bs = kd.rect_batch_shapes(shapes, batch_size=2, imgsz=640, pad=0.0)
    ar = shapes[order, 0] / shapes[order, 1]
    assert (np.diff(ar) >= 0).all()
    assert bs.tolist() == [[512, 640], [640, 640], [640, 256]]  # fits 640x480 (ar .75) and 213x640 (ar 3)
    assert (bs % 64 == 0).all()


# ----------------------------------------------------------------------------------------------
# Loader
def test_collate_and_loader(coco_mini_yaml):
    ds = kd.PoseDataset(load_dataset_config(coco_mini_yaml), "train", 256, augment=True)
    loader = kd.build_dataloader(ds, batch_size=2, workers=0, shuffle=True, seed=0)
    images, targets, metas = next(iter(loader))
    assert images.shape == (2, 3, 256, 256) and images.dtype == torch.uint8
    assert targets.shape[1] == TargetLayout(17).width and set(targets[:, 0].tolist()) <= {0.0, 1.0}
    assert len(metas) == 2 and {"image_id", "path", "orig_shape"} <= set(metas[0])
    box = targets[:, 2:6]
    assert ((box[:, :2] >= 0) & (box[:, :2] <= 1)).all()


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_is_deterministic(coco_mini_yaml, workers):
    cfg = load_dataset_config(coco_mini_yaml)

    def first_batch(seed):
        ds = kd.PoseDataset(cfg, "train", 256, augment=True)
        images, targets, _ = next(iter(kd.build_dataloader(ds, 2, workers, shuffle=True, seed=seed)))
        return images, targets

    a, b, c = first_batch(3), first_batch(3), first_batch(4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_rect_loader_rejects_shuffle(coco_mini_yaml):
    ds = kd.PoseDataset(load_dataset_config(coco_mini_yaml), "val", 256, rect=True, batch_size=2)
    with pytest.raises(ConfigError, match="shuffle=False"):
        kd.build_dataloader(ds, 2, 0, shuffle=True)
    images, _, _ = next(iter(kd.build_dataloader(ds, 2, 0, shuffle=False)))
    assert tuple(images.shape[2:]) == tuple(ds.batch_shapes[0])


def test_imgsz_must_be_stride_multiple(coco_mini_yaml):
    with pytest.raises(ConfigError, match="multiple of 64"):
        kd.PoseDataset(load_dataset_config(coco_mini_yaml), "val", 300)


def test_cache_images_gives_same_items(coco_mini_yaml):
    cfg = load_dataset_config(coco_mini_yaml)
    a, b = kd.PoseDataset(cfg, "val", 256), kd.PoseDataset(cfg, "val", 256, cache_images=True)
    for i in range(len(a)):
        assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1])


# ----------------------------------------------------------------------------------------------
# Drawing
def test_draw_poses_skips_unlabelled_and_does_not_mutate():
    schema = make_schema(3)
    img = np.zeros((60, 60, 3), np.uint8)
    kpts = np.array([[[10, 10, 0.9], [50, 10, 0.8], [30, 50, 0.0]]], np.float32)
    out = draw_poses(img, np.array([[5, 5, 55, 55]]), kpts, schema, scores=[0.9], line_width=2)
    assert img.sum() == 0
    assert out[10, 30].any()  # limb 0-1 drawn
    assert not out[40, 40].any() and not out[30, 40].any()  # limb 1-2 not drawn (2 has conf 0)
    assert out[10, 10].any() and not out[50, 30].any()


def test_draw_poses_threshold_none_draws_all_and_mask_draws_fused_only():
    """predict draws every keypoint (kp_threshold=None); --fused-only passes Poses.fused as the mask
    (unfused keypoints have a confidence > 0 too, so a threshold cannot tell them apart)."""
    schema = make_schema(3)
    img = np.zeros((60, 60, 3), np.uint8)
    kpts = np.array([[[10, 10, 0.9], [50, 10, 0.4], [30, 50, 0.0]]], np.float32)
    fused = np.array([[True, False, False]])
    everything = draw_poses(img, np.array([[5, 5, 55, 55]]), kpts, schema, line_width=2, kp_threshold=None)
    fused_only = draw_poses(img, np.array([[5, 5, 55, 55]]), kpts, schema, line_width=2, kp_threshold=None,
                            keypoint_mask=torch.from_numpy(fused))
    assert everything[10, 50].any() and everything[50, 30].any() and everything[10, 30].any()
    assert not fused_only[10, 50].any() and not fused_only[10, 30].any() and fused_only[10, 10].any()


def test_render_batch_writes_a_grid(coco_mini_yaml, tmp_path):
    ds = kd.PoseDataset(load_dataset_config(coco_mini_yaml), "train", 256, augment=True)
    images, targets, _ = kd.collate([ds[i] for i in range(3)])
    path = render_batch(images, targets, ds.schema, tmp_path / "sub" / "batch.jpg")
    grid = cv2.imread(str(path))
    assert grid.shape == (2 * 256, 2 * 256, 3)
    plain = render_batch(images, targets[:0], ds.schema, tmp_path / "plain.jpg")
    diff = np.abs(cv2.imread(str(plain)).astype(int) - grid.astype(int)).sum(2)
    assert (diff > 60).mean() > 0.002  # skeletons and boxes changed a visible share of pixels


def test_invalid_json_is_a_data_error(tmp_path):
    (tmp_path / "images").mkdir()
    ann = tmp_path / "a.json"
    ann.write_text("{not json")
    with pytest.raises(DataError, match="a.json: not a valid COCO-format JSON"):
        kd.PoseDataset(dataset_config(tmp_path, ann, make_schema(3)), "val", 256)


def test_dataset_pickles_without_the_coco_object(coco_mini_yaml):
    """Spawned workers receive a pickled dataset: it must work there and leave the COCO index behind."""
    import pickle

    ds = kd.PoseDataset(load_dataset_config(coco_mini_yaml), "val", 256)
    _ = ds.coco
    blob = pickle.dumps(ds)
    clone = pickle.loads(blob)
    assert clone._coco is None and torch.equal(clone[1][1], ds[1][1])


def test_json_size_differs_from_image_rescales_labels(tmp_path):
    """Images resized after annotation: labels follow the pixels, and the images are counted."""
    cfg, sources = make_dataset(tmp_path / "d", k=4)
    data = json.loads(cfg.annotations["val"].read_text())
    for im in data["images"]:
        im["width"], im["height"] = im["width"] * 2, im["height"] * 2
    for a in data["annotations"]:
        a["bbox"] = [v * 2 for v in a["bbox"]]
        kp = np.array(a["keypoints"], float).reshape(-1, 3)
        kp[:, :2] *= 2
        a["keypoints"] = kp.reshape(-1).tolist()
    cfg.annotations["val"].write_text(json.dumps(data))
    ds = kd.PoseDataset(cfg, "val", 256)
    assert ds.stats.size_mismatch == 4 and ds.stats.kpts_dropped == 0
    np.testing.assert_allclose(ds.labels.instances(0).keypoints, sources[TAGS[0]], atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Hardening: image formats, paths and malformed annotation files
def test_exif_rotated_image_labels_line_up(tmp_path):
    """A JPEG stored sideways with EXIF orientation 6 (rotate 90° clockwise to display), labelled on
    the displayed image as COCO tools do: the loaded item shows the labelled content at each keypoint."""
    from PIL import Image

    raw = np.full((64, 96, 3), 255, np.uint8)  # stored pixels, RGB: h 64, w 96
    raw[:16, :16] = (255, 0, 0)  # red at the stored top-left    -> displayed top-right
    raw[-16:, :16] = (0, 255, 0)  # green at the stored bottom-left -> displayed top-left
    pil = Image.fromarray(raw)
    exif = pil.getexif()
    exif[0x0112] = 6
    (tmp_path / "images").mkdir()
    pil.save(tmp_path / "images" / "side.jpg", exif=exif, quality=95)
    kpts = [64 - 8, 8, 2, 8, 8, 2, 0, 0, 0]  # displayed frame (w 64, h 96): red centre, green centre
    ann = tmp_path / "a.json"
    write_coco(ann, [{"id": 1, "file_name": "side.jpg", "height": 96, "width": 64}],
               [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [2, 2, 60, 20], "keypoints": kpts}], 3)
    ds = kd.PoseDataset(dataset_config(tmp_path, ann, make_schema(3)), "val", 128)
    assert ds.labels.apply_exif.tolist() == [True] and ds.labels.shapes.tolist() == [[96, 64]]
    image, targets, meta = ds[0]
    assert meta["orig_shape"] == (96, 64)
    kp = targets[targets[:, TargetLayout.cls] == 0][0, TargetLayout(3).kpt].reshape(3, 3).numpy()
    h, w = image.shape[1:]
    for (x, y, v), colour in zip(kp[:2], ((255, 0, 0), (0, 255, 0))):
        assert v > 0
        rgb = image[:, int(y * h), int(x * w)].numpy().astype(int)
        assert np.abs(rgb - colour).max() < 40, (rgb, colour)


def test_paths_with_spaces_and_non_ascii_characters(tmp_path):
    root = tmp_path / "my data ñ" / "图像 set"
    cfg, sources = make_dataset(root, k=4)
    ann = cfg.annotations["val"]
    data = json.loads(ann.read_text())
    for im in data["images"]:
        new = f"foto {im['id']} é 人.png"
        (root / "images" / im["file_name"]).rename(root / "images" / new)
        im["file_name"] = new
    ann.write_text(json.dumps(data))
    ds = kd.PoseDataset(cfg, "val", 128)
    assert (ds.stats.images, ds.stats.persons, ds.stats.missing, ds.stats.corrupt) == (4, 8, 0, 0)
    assert all(ds[i][1].shape[0] > 0 for i in range(len(ds)))
    again = kd.PoseDataset(cfg, "val", 128)  # the label cache works with these names too
    assert again._coco is None and again.image_ids == ds.image_ids


IMG = {"id": 1, "file_name": "x.png", "height": 50, "width": 60}
ANN = {"id": 5, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [1, 1, 20, 20], "keypoints": [5, 5, 2] * 3}
CATS = [{"id": 1, "name": "person", "keypoints": ["a", "b", "c"]}]


def _one_image_dataset(tmp_path: Path, text: str) -> DatasetConfig:
    (tmp_path / "images").mkdir(exist_ok=True)
    cv2.imwrite(str(tmp_path / "images" / "x.png"), coord_image(50, 60, 3))
    ann = tmp_path / "a.json"
    ann.write_text(text)
    return dataset_config(tmp_path, ann, make_schema(3))


@pytest.mark.parametrize("text, match", [
    ("", r"a\.json is empty \(0 bytes\)"),
    ("{}", r"a\.json lists none \(its 'images' list is empty or missing\)"),
    ("[]", r"a\.json: not a COCO annotation file"),
    ('{"images": [', r"a\.json: not a valid COCO-format JSON"),
    (json.dumps({"images": [IMG], "annotations": [{k: v for k, v in ANN.items() if k != "image_id"}]}),
     r"a\.json: annotation id 5 has no 'image_id'"),
    (json.dumps({"images": [IMG], "annotations": [{k: v for k, v in ANN.items() if k != "bbox"}]}),
     r"a\.json: annotation id 5 has no 'bbox'"),
    (json.dumps({"images": [IMG], "annotations": [dict(ANN, bbox=["a", 1, 2, 3])]}),
     r"annotation id 5: 'bbox' must be a list of numbers"),
    (json.dumps({"images": [IMG], "annotations": [dict(ANN, bbox=None)]}), r"annotation id 5: 'bbox' must be a list of numbers"),
    (json.dumps({"images": [IMG], "annotations": [dict(ANN, keypoints=["a"] * 9)]}),
     r"annotation id 5: 'keypoints' must be a list of numbers"),
    (json.dumps({"images": [IMG], "annotations": [dict(ANN, keypoints=7)]}), r"annotation id 5: 'keypoints' must be a list"),
    (json.dumps({"images": [{"id": 1, "height": 50, "width": 60}], "annotations": []}),
     r"a\.json: image id 1 needs a 'file_name'"),
    (json.dumps({"images": [dict(IMG, height="tall")], "annotations": []}), r"image id 1 needs .*'width'/'height'"),
], ids=["0-bytes", "empty-object", "list", "truncated", "no-image_id", "no-bbox", "bbox-text", "bbox-null",
        "keypoints-text", "keypoints-number", "no-file_name", "height-text"])
def test_unusable_annotation_files_name_the_file(tmp_path, text, match):
    with pytest.raises(DataError, match=match) as e:
        kd.PoseDataset(_one_image_dataset(tmp_path, text), "val", 128)
    assert str(tmp_path / "a.json") in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("body", [{"images": [IMG], "annotations": [], "categories": CATS}, {"images": [IMG]}],
                         ids=["empty-list", "no-key"])
def test_json_without_annotations_is_a_negative_only_dataset(tmp_path, body, caplog):
    with caplog.at_level("INFO", logger="kapao"):
        ds = kd.PoseDataset(_one_image_dataset(tmp_path, json.dumps(body)), "train", 128)
    assert (ds.stats.images, ds.stats.negatives, ds.stats.persons) == (1, 1, 0)
    assert ds[0][1].shape[0] == 0
    assert any("no usable person annotations; all 1 images are negatives" in r.getMessage() for r in caplog.records)


def test_orphan_and_crowd_only_annotations(tmp_path):
    """Annotations of image ids missing from 'images' are counted and skipped; an image whose only
    person is a crowd region is a negative in training and keeps its annotation for validation."""
    crowd = dict(ANN, iscrowd=1, keypoints=[0] * 9)
    body = {"images": [IMG, dict(IMG, id=2, file_name="y.png")], "categories": CATS,
            "annotations": [dict(ANN, id=6, image_id=99), dict(crowd, image_id=2), dict(ANN, id=7)]}
    cfg = _one_image_dataset(tmp_path, json.dumps(body))
    cv2.imwrite(str(tmp_path / "images" / "y.png"), coord_image(50, 60, 4))
    train = kd.PoseDataset(cfg, "train", 128)
    s = train.stats
    assert (s.images, s.persons, s.negatives, s.crowd_skipped, s.orphan_annotations) == (2, 1, 1, 1, 1)
    assert "1 annotations of image ids missing from 'images' skipped" in s.summary()
    assert train[train.image_ids.index(2)][1].shape[0] == 0
    val = kd.PoseDataset(cfg, "val", 128)
    assert (val.stats.persons, val.stats.crowd_skipped) == (2, 0)
