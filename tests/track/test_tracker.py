"""Tracking on synthetic sequences with known truth: crossings, occlusion, a person leaving and coming back."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kapao.cfg.settings import OneEuroSettings
from kapao.errors import ConfigError
from kapao.poses import Poses
from kapao.track.tracker import (
    UNTRACKED,
    PoseTracker,
    TrackerInput,
    id_switches,
    load_tracker_config,
)

K = 17
FPS = 30.0


def poses_of(boxes: list[list[float]], score: float = 0.9) -> Poses:
    """Poses whose keypoints are spread over each box (a fixed template), for hand-built frames."""
    b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    u = torch.linspace(0.1, 0.9, K)
    kx = b[:, :1] + (b[:, 2:3] - b[:, :1]) * u.flip(0)[None]
    ky = b[:, 1:2] + (b[:, 3:4] - b[:, 1:2]) * u[None]
    kp = torch.stack([kx, ky, torch.full_like(kx, 0.8)], -1)
    return Poses(b, torch.full((len(b),), score), kp)


def walk(x0: float, y0: float, vx: float, frames: range, w: float = 80, h: float = 200) -> dict[int, list[float]]:
    """Box of a person walking at vx pixels per frame, per frame index."""
    return {f: [x0 + vx * f, y0, x0 + vx * f + w, y0 + h] for f in frames}


def run(tracker: PoseTracker, people: dict[int, dict[int, list[float]]], frames: int,
        hidden: set[tuple[int, int]] = frozenset()) -> tuple[list[np.ndarray], list[np.ndarray], list[Poses]]:
    """Feed the frames; `hidden` (person, frame) pairs are not detected. Returns truth ids, track ids, outputs."""
    truth, pred, outs = [], [], []
    for f in range(frames):
        visible = [p for p, track in people.items() if f in track and (p, f) not in hidden]
        out = tracker(poses_of([people[p][f] for p in visible]), f / FPS)
        truth.append(np.array(visible, np.int64))
        pred.append(out.track_ids.numpy())
        outs.append(out)
    return truth, pred, outs


def check_consistent(truth: list[np.ndarray], pred: list[np.ndarray]) -> None:
    """Ids are distinct within a frame, and no id ever covers two different people."""
    owner: dict[int, int] = {}
    for t_ids, p_ids in zip(truth, pred):
        tracked = p_ids[p_ids != UNTRACKED]
        assert len(set(tracked.tolist())) == len(tracked)
        for person, track in zip(t_ids.tolist(), p_ids.tolist()):
            if track != UNTRACKED:
                assert owner.setdefault(track, person) == person, f"track {track} jumped from {owner[track]} to {person}"


def occluded(people: dict[int, dict[int, list[float]]], back: int, front: int, frames: int, ioa: float = 0.5) -> set:
    """(back, frame) pairs where `front` covers more than `ioa` of `back`'s box (the detector misses it)."""
    out = set()
    for f in range(frames):
        if f in people[back] and f in people[front]:
            a, b = np.array(people[back][f]), np.array(people[front][f])
            inter = np.clip(np.minimum(a[2:], b[2:]) - np.maximum(a[:2], b[:2]), 0, None).prod()
            if inter / np.prod(a[2:] - a[:2]) > ioa:
                out.add((back, f))
    return out


@pytest.mark.parametrize("tracker", ["bytetrack", "botsort"])
@pytest.mark.parametrize("speed", [4.0, 12.0])
def test_crossing_people_keep_their_ids(tracker: str, speed: float):
    people = {0: walk(100, 100, speed, range(60)), 1: walk(100 + 59 * speed, 110, -speed, range(60), h=210)}
    hidden = occluded(people, back=0, front=1, frames=60)
    assert hidden  # the back person really disappears for a while behind the front one
    truth, pred, _ = run(PoseTracker(tracker), people, 60, hidden)
    check_consistent(truth, pred)
    assert id_switches(truth, pred) == 0
    assert set(np.concatenate(pred).tolist()) == {1, 2}


def test_short_occlusion_keeps_the_id():
    people = {0: walk(50, 50, 5, range(40)), 1: walk(600, 80, -3, range(40))}
    hidden = {(0, f) for f in range(15, 20)}  # 5 frames gone, well within the 30-frame buffer
    truth, pred, _ = run(PoseTracker(), people, 40, hidden)
    check_consistent(truth, pred)
    assert id_switches(truth, pred) == 0
    assert all(len(p) == 1 for p in pred[15:20])  # only the other person during the gap


def test_person_leaving_and_coming_back_after_the_buffer_gets_one_new_id_and_its_filter_is_dropped():
    cfg_buffer = load_tracker_config("bytetrack").track_buffer
    gone = range(20, 20 + cfg_buffer + 10)  # longer than the tracker keeps lost tracks
    people = {0: {f: b for f, b in walk(300, 100, 0.5, range(90)).items() if f not in gone},
              1: walk(700, 120, 0.0, range(90))}
    tracker = PoseTracker(smooth=OneEuroSettings())
    truth, pred, _ = run(tracker, people, 20 + cfg_buffer + 2)
    assert tracker.alive_ids() == {2} and sorted(tracker.smoother.track_ids) == [2]  # track 1 removed, filter dropped
    t2, p2, _ = run_more(tracker, people, range(20 + cfg_buffer + 2, 90))
    truth, pred = truth + t2, pred + p2
    check_consistent(truth, pred)
    assert id_switches(truth, pred) == 1  # exactly one: boxes alone cannot re-identify someone who left
    back = [p[t == 0] for t, p in zip(truth, pred) if (t == 0).any()][-1]
    assert back.tolist() == [3]


def run_more(tracker: PoseTracker, people: dict, frames: range) -> tuple[list, list, list]:
    truth, pred, outs = [], [], []
    for f in frames:
        visible = [p for p, track in people.items() if f in track]
        out = tracker(poses_of([people[p][f] for p in visible]), f / FPS)
        truth.append(np.array(visible, np.int64))
        pred.append(out.track_ids.numpy())
        outs.append(out)
    return truth, pred, outs


def test_a_new_person_is_untracked_on_its_first_frame_then_gets_the_next_id():
    people = {0: walk(50, 50, 2, range(10)), 1: walk(500, 50, -2, range(4, 10))}
    _, pred, _ = run(PoseTracker(), people, 10)
    assert pred[0].tolist() == [1]  # frame 1: every detection starts a confirmed track at once
    assert pred[4].tolist() == [1, UNTRACKED]  # a later newcomer is confirmed on its second frame
    assert pred[5].tolist() == [1, 2]


def test_tracking_does_not_change_poses_and_smoothing_only_moves_tracked_keypoints():
    rng = np.random.default_rng(0)
    people = {0: walk(100, 100, 3, range(20))}
    tracker, plain = PoseTracker(smooth=OneEuroSettings()), PoseTracker()
    for f in range(20):
        p = poses_of([people[0][f]])
        p.keypoints[..., :2] += torch.from_numpy(rng.normal(0, 2, (1, K, 2))).float()
        before = p.keypoints.clone()
        a, b = tracker(p, f / FPS), plain(p, f / FPS)
        assert torch.equal(p.keypoints, before) and p.track_ids is None  # input untouched
        assert torch.equal(b.keypoints, before) and torch.equal(a.boxes, p.boxes) and torch.equal(a.scores, p.scores)
        assert torch.equal(a.keypoints[..., 2], before[..., 2])  # confidences kept
        assert a.track_ids.dtype == torch.int64 and a.track_ids.tolist() == [1]
        if f == 0:
            assert torch.equal(a.keypoints, before)  # a new track starts from its raw keypoints
    assert not torch.equal(a.keypoints, before)


def test_empty_frames_and_reset():
    tracker = PoseTracker(smooth=OneEuroSettings())
    out = tracker(Poses.empty(K), 0.0)
    assert out.track_ids.shape == (0,)
    tracker(poses_of([[0, 0, 50, 100]]), 1 / FPS)
    tracker.reset()
    assert tracker.alive_ids() == set() and len(tracker.smoother) == 0
    assert tracker(poses_of([[0, 0, 50, 100]]), 2 / FPS).track_ids.tolist() == [1]  # ids restart per video


def test_botsort_with_camera_motion_compensation_on_images():
    rng = np.random.default_rng(0)
    tracker = PoseTracker("botsort")
    image = rng.integers(0, 255, (240, 320, 3), np.uint8)
    for f in range(3):
        out = tracker(poses_of([[10 + f, 10, 60 + f, 110]]), f / FPS, np.roll(image, f, axis=1))
    assert out.track_ids.tolist() == [1]


def test_detections_view_matches_poses():
    p = poses_of([[0, 0, 10, 20], [5, 5, 25, 45]])
    d = TrackerInput.from_poses(p)
    np.testing.assert_allclose(d.xywh, [[5, 10, 10, 20], [15, 25, 20, 40]])
    sub = d[np.array([False, True])]
    assert len(sub) == 1 and sub.conf.tolist() == pytest.approx([0.9]) and sub.keypoints.shape == (1, K, 2)


def test_id_switches_counts_every_change_of_a_persons_id():
    truth = [np.array([0, 1]), np.array([0, 1]), np.array([1]), np.array([0, 1]), np.array([0, 1])]
    pred = [np.array([1, 2]), np.array([2, 1]), np.array([1]), np.array([UNTRACKED, 1]), np.array([2, 3])]
    assert id_switches(truth, pred) == 3  # 0: 1->2; 1: 2->1, 1->3; untracked frames do not count


def test_tracker_configs(tmp_path):
    assert load_tracker_config("bytetrack").tracker_type == "bytetrack"
    assert load_tracker_config("botsort").gmc_method
    own = tmp_path / "mine.yaml"
    own.write_text("tracker_type: bytetrack\ntrack_buffer: 90\n")
    cfg = load_tracker_config(own)
    assert cfg.track_buffer == 90 and cfg.match_thresh == load_tracker_config("bytetrack").match_thresh
    bad = {"type.yaml": "tracker_type: sort\n", "reid.yaml": "tracker_type: botsort\nwith_reid: true\n",
           "range.yaml": "tracker_type: bytetrack\nmatch_thresh: 3\n", "list.yaml": "- 1\n",
           "text.yaml": "tracker_type: botsort\ntrack_buffer: long\n"}
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=name):
            load_tracker_config(tmp_path / name)
    for arg in ("deepsort", tmp_path / "missing.yaml"):
        with pytest.raises(ConfigError, match="--tracker"):
            load_tracker_config(arg)


def test_poses_track_ids_shape_is_checked_and_moves_with_to():
    p = poses_of([[0, 0, 10, 20]])
    with pytest.raises(ValueError, match="track_ids"):
        Poses(p.boxes, p.scores, p.keypoints, track_ids=torch.zeros(2, dtype=torch.int64))
    q = Poses(p.boxes, p.scores, p.keypoints, track_ids=torch.tensor([4])).to("cpu")
    assert q.track_ids.tolist() == [4]


def test_update_frame_restarts_tracks_per_video_and_counts_tracks():
    from kapao.data.sources import Frame

    image = np.zeros((8, 8, 3), np.uint8)
    step = PoseTracker(smooth=OneEuroSettings())
    people = {0: walk(50, 50, 2, range(6)), 1: walk(500, 50, -2, range(2, 6))}
    for video in ("a.mp4", "b.mp4"):
        for f in range(6):
            visible = [p for p in people if f in people[p]]
            out = step.update_frame(Frame(image, video, f, 25.0), poses_of([people[p][f] for p in visible]))
        assert out.track_ids.tolist() == [1, 2]  # ids restart at 1 in each video
    assert step.tracks_total == 4
    for i in range(3):  # a folder of images is one sequence in the given order
        out = step.update_frame(Frame(image, f"img{i}.jpg"), poses_of([[10 + i, 10, 60, 110]]))
    assert out.track_ids.tolist() == [1] and step.tracks_total == 5


# ----------------------------------------------------------------------------------------------
# The verbs: `kapao track`, `kapao predict --track`, KAPAO.track
@pytest.fixture(scope="module")
def eager_weights(tmp_path_factory):
    from kapao.weights.checkpoint import save_checkpoint
    from tests.infer.test_predictor import (
        eager_model,  # an untrained size-n model that finds poses everywhere
    )

    path = tmp_path_factory.mktemp("w") / "eager.pt"
    save_checkpoint(path, eager_model(), extra={"epoch": 0})
    return path


def test_track_cli_on_video_writes_tracked_json_csv_and_video(eager_weights, test_video, tmp_path):
    import csv
    import json

    import cv2
    from click.testing import CliRunner

    from kapao.cli.main import cli

    args = [str(test_video), "--weights", str(eager_weights), "--imgsz", "192", "--device", "cpu", "--conf", "0.5",
            "--max-det", "5", "--project", str(tmp_path), "--save-csv"]
    res = CliRunner().invoke(cli, ["track", *args, "--boxes"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "exp"
    assert "5 frames" in res.output and " tracks in " in res.output and f"Results saved to {out}" in res.output
    records = json.loads((out / "predictions.json").read_text())
    assert records
    by_frame: dict = {}
    for r in records:
        by_frame.setdefault(r["image_id"], []).append(r.get("track_id"))  # absent: in no confirmed track yet
    assert sorted(by_frame) == [0, 1, 2, 3, 4]
    assert all(t is not None for t in by_frame[0])  # the first frame confirms every detection at once
    for ids in by_frame.values():
        tracked = [t for t in ids if t is not None]
        assert len(set(tracked)) == len(tracked)
    with open(out / "keypoints.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 17 * len(records)
    assert {r["frame"] for r in rows} == {"0", "1", "2", "3", "4"} and rows[0]["source"] == test_video.name
    assert int(cv2.VideoCapture(str(out / "posetrack-000001.mp4")).get(cv2.CAP_PROP_FRAME_COUNT)) == 5

    for extra in (["--track"], [], ["--track", "--smooth"]):  # predict --track: smoothed only with --smooth
        res = CliRunner().invoke(cli, ["predict", *args, "--nosave", *extra])
        assert res.exit_code == 0, res.output
    tracked_raw, untracked, smoothed = (json.loads((tmp_path / f"exp{i}" / "predictions.json").read_text())
                                        for i in (2, 3, 4))
    assert [r["keypoints"] for r in tracked_raw] == [r["keypoints"] for r in untracked]
    assert [r["keypoints"] for r in smoothed] == [r["keypoints"] for r in records]  # `track` smooths by default
    assert [r.get("track_id") for r in tracked_raw] == [r.get("track_id") for r in records]  # same ids as `track`
    assert all("track_id" not in r for r in untracked)


@pytest.mark.parametrize("argv, phrase", [
    (["predict", "{video}", "--tracker", "botsort"], "need --track"),
    (["predict", "{video}", "--smooth"], "need --track"),
    (["predict", "{video}", "--track", "--resume"], "drop --track or --resume"),
    (["track", "{video}", "--tracker", "sort"], "use bytetrack or botsort, or a tracker YAML"),
    (["track", "{video}", "--tracker", "{tmp}/none.yaml"], "no such file"),
    (["track", "{video}", "--no-smooth", "--smooth-beta", "2"], "drop them or drop --no-smooth"),
    (["track", "{video}", "--smooth-cutoff", "0"], "x>0"),
])
def test_track_usage_errors(test_video, tmp_path, argv, phrase):
    from click.testing import CliRunner

    from kapao.cli.main import cli

    argv = [a.replace("{video}", str(test_video)).replace("{tmp}", str(tmp_path)) for a in argv]
    res = CliRunner().invoke(cli, argv)
    assert res.exit_code == 2, res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("Error: ") and phrase in last, last


def test_kapao_track_yields_frames_lazily_with_ids(eager_weights, test_video):
    import cv2

    from kapao.cfg.settings import PREDICT_SETTINGS
    from kapao.infer.predictor import KAPAO

    api = KAPAO(eager_weights, device="cpu")
    settings = PREDICT_SETTINGS.replace(conf=0.5, max_det=5)
    stream = api.track(str(test_video), imgsz=192, settings=settings)
    first = next(stream)  # a generator: the first frame comes before the video is read to the end
    rest = list(stream)
    assert len(rest) == 4 and all(p.track_ids is not None and p.track_ids.shape == (len(p),) for p in [first, *rest])
    assert (first.track_ids >= 1).all()
    cap = cv2.VideoCapture(str(test_video))
    frames = [cap.read()[1] for _ in range(5)]
    arrays = list(api.track(iter(frames), imgsz=192, settings=settings, smooth=False, fps=30))
    raw = list(api.track(str(test_video), imgsz=192, settings=settings, smooth=False))
    for a, b in zip(arrays, raw):
        assert torch.equal(a.track_ids, b.track_ids) and torch.allclose(a.keypoints, b.keypoints)


@pytest.mark.slow
def test_trackers_never_install_or_download_anything():
    """ultralytics pip-installs lap when it is missing and downloads ReID models: kapao must reach neither."""
    import subprocess
    import sys

    guard = ("import ultralytics.utils.checks as c, ultralytics.utils.downloads as d\n"
             "def boom(*a, **k): raise SystemExit('tried to install or download')\n"
             "c.check_requirements = d.attempt_download_asset = boom\n")
    use = ("import numpy as np, torch\nfrom kapao.poses import Poses\nfrom kapao.track.tracker import PoseTracker\n"
           "p = Poses(torch.tensor([[0., 0, 50, 100]]), torch.tensor([.9]), torch.zeros(1, 17, 3))\n"
           "for name in ('bytetrack', 'botsort'):\n"
           "    t = PoseTracker(name)\n"
           "    for f in range(3): out = t(p, f / 30, np.zeros((120, 160, 3), np.uint8))\n"
           "    assert out.track_ids.tolist() == [1]\n")
    ok = subprocess.run([sys.executable, "-c", guard + use], check=False, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    no_lap = subprocess.run([sys.executable, "-c", "import sys\nsys.modules['lap'] = None\n" + guard + use],
                            check=False, capture_output=True, text=True, timeout=300)
    assert no_lap.returncode != 0 and "tracking needs the 'lap' package" in no_lap.stderr
    assert "tried to install" not in no_lap.stderr + no_lap.stdout


def test_run_with_a_tracking_step_gives_what_track_yields(eager_weights, test_video):
    """KAPAO.run and KAPAO.track share one frame loop: tracking as run's per-frame step gives the same poses,
    ids and (smoothed) keypoints, bit for bit, as the track generator."""
    from kapao.cfg.settings import PREDICT_SETTINGS
    from kapao.infer.predictor import KAPAO

    api = KAPAO(eager_weights, device="cpu", backend="torch")  # the loop is the same on every backend
    settings = PREDICT_SETTINGS.replace(conf=0.5, max_det=5)
    tracked = list(api.track(str(test_video), imgsz=128, settings=settings))  # smoothed: the default
    step = PoseTracker("bytetrack", OneEuroSettings())
    run = api.run(str(test_video), imgsz=128, settings=settings, save=False, save_json=False, keep_results=True,
                  transforms=[step.update_frame])
    assert run.save_dir is None and len(run.results) == len(tracked) == 5
    assert sum(len(p) for p in tracked) > 0
    for a, b in zip(run.results, tracked):
        assert torch.equal(a.track_ids, b.track_ids) and torch.equal(a.keypoints, b.keypoints)
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores)
