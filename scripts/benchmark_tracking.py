"""Tracking: id switches on synthetic multi-person sequences, and the cost of tracking + smoothing on video.

Part 1 (synthetic, no network, seconds): people with distinct poses walk across a 1280x720 frame,
crossing and occluding each other (a person more than half covered by someone in front is not
detected), entering and leaving; boxes and keypoints carry detector-like noise and a few detections are
missed. Reports true people, tracks created and id switches (exact: every detection knows its person)
for ByteTrack and BoT-SORT on boxes only, and for ByteTrack whose association cost also uses keypoint
similarity (OKS against the track's last keypoints moved with its Kalman prediction) at several weights.

Part 2 (--video, timing; run on an idle machine): the video looped to --frames frames, at --imgsz on
--device; fps of predict alone vs predict + tracking + smoothing (same frames, same model), the share of
frame time that tracking + smoothing take, and the peak RSS.

    python scripts/benchmark_tracking.py                                  # part 1
    python scripts/benchmark_tracking.py --video ../shared/data/videos/posetrack-000001.mp4 \\
        --weights kapao_s_coco --imgsz 640 --device cpu --frames 60       # parts 1 and 2
"""
from __future__ import annotations

import argparse
import resource
import time
from types import SimpleNamespace

import numpy as np
import torch
from ultralytics.trackers.byte_tracker import BYTETracker

from kapao.cfg.dataset import load_dataset_config
from kapao.poses import Poses
from kapao.track.tracker import (
    TRACKERS,
    UNTRACKED,
    PoseTracker,
    TrackerInput,
    assign_track_ids,
    id_switches,
    load_tracker_config,
)

W, H = 1280, 720


# ----------------------------------------------------------------------------------------------
class OksByteTracker(BYTETracker):
    """ByteTrack whose association cost blends in keypoint dissimilarity: (1 - w) * cost + w * (1 - OKS).

    A track's keypoints are those of its last detection, moved by the Kalman-predicted shift of its box
    centre; OKS uses the box area as scale and the COCO sigmas.
    """

    def __init__(self, args: SimpleNamespace, sigmas: np.ndarray, weight: float) -> None:
        super().__init__(args)
        self.sigmas, self.weight = np.asarray(sigmas), weight
        self.last: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # track id -> (keypoints (K, 2), box centre (2,))
        self.frame_kpts = np.zeros((0, len(sigmas), 2))

    def update(self, results: TrackerInput, img: np.ndarray | None = None, **kwargs) -> np.ndarray:
        self.frame_kpts = results.keypoints
        out = super().update(results, img, **kwargs)
        centres = results.xywh[:, :2]
        for t in self.tracked_stracks:
            if t.frame_id == self.frame_id:  # updated or started on this frame: idx is this frame's detection
                self.last[t.track_id] = (self.frame_kpts[int(t.idx)], centres[int(t.idx)])
        alive = {t.track_id for t in (*self.tracked_stracks, *self.lost_stracks)}
        self.last = {i: v for i, v in self.last.items() if i in alive}
        return out

    def get_dists(self, tracks: list, detections: list) -> np.ndarray:
        cost = super().get_dists(tracks, detections)
        if cost.size == 0 or self.weight == 0:
            return cost
        det_kp = self.frame_kpts[[int(d.idx) for d in detections]]  # (D, K, 2)
        oks_cost = cost.copy()
        for i, t in enumerate(tracks):
            if t.track_id not in self.last:
                continue
            kp, centre = self.last[t.track_id]
            pred = kp + (t.xywh[:2] - centre)
            area = max(t.xywh[2] * t.xywh[3], 1.0)
            d2 = ((det_kp - pred) ** 2).sum(-1)  # (D, K)
            oks_cost[i] = 1 - np.exp(-d2 / (2 * area * (2 * self.sigmas) ** 2)).mean(-1)
        return (1 - self.weight) * cost + self.weight * oks_cost


# ----------------------------------------------------------------------------------------------
def synthetic_sequence(people: int, frames: int, rng: np.random.Generator, box_noise: float = 0.02,
                       kp_noise: float = 0.01, miss: float = 0.03) -> list[tuple[np.ndarray, Poses]]:
    """Frames of people crossing a W x H view: per frame (true person of each detection (N,), Poses).

    Each person has a height of 150-350 px, its own pose (keypoints relative to its box), a constant
    speed that changes now and then, and enters/leaves through the sides. Noise is relative to height.
    """
    k = 17
    height = rng.uniform(150, 350, people)
    width = height * rng.uniform(0.3, 0.5, people)
    template = np.stack([rng.uniform(0.05, 0.95, (people, k)), np.sort(rng.uniform(0.02, 0.98, (people, k)), 1)], -1)
    start = rng.integers(0, frames // 2, people)
    x = np.where(rng.random(people) < 0.5, -width, W)  # enter from the left or the right
    v = np.where(x < 0, 1, -1) * rng.uniform(2, 8, people)
    y = rng.uniform(0.35, 0.95, people) * H - height  # feet between 35 % and 95 % of the view's height
    out = []
    for f in range(frames):
        turn = rng.random(people) < 0.01
        v = np.where(turn, -v, v)
        x = x + np.where(f >= start, v, 0)
        boxes = np.stack([x, y, x + width, y + height], 1)
        shown = (f >= start) & (boxes[:, 2] > 0) & (boxes[:, 0] < W)
        front = np.argsort(-boxes[:, 3])  # larger y2 = nearer the camera
        visible = []
        for rank, p in enumerate(front):
            if not shown[p] or rng.random() < miss:
                continue
            covered = max((_ioa(boxes[p], boxes[q]) for q in front[:rank] if shown[q]), default=0.0)
            if covered <= 0.5:
                visible.append(p)
        visible = np.array(sorted(visible), np.int64)
        out.append((visible, _noisy_poses(boxes[visible], template[visible], height[visible], box_noise, kp_noise, rng)))
    return out


def _ioa(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of box a covered by box b."""
    inter = np.clip(np.minimum(a[2:], b[2:]) - np.maximum(a[:2], b[:2]), 0, None).prod()
    return float(inter / max(np.prod(a[2:] - a[:2]), 1e-9))


def _noisy_poses(boxes: np.ndarray, template: np.ndarray, height: np.ndarray, box_noise: float, kp_noise: float,
                 rng: np.random.Generator) -> Poses:
    n = len(boxes)
    wh = boxes[:, 2:] - boxes[:, :2]
    kp = boxes[:, None, :2] + template * wh[:, None] + rng.normal(0, 1, (n, 17, 2)) * kp_noise * height[:, None, None]
    b = boxes + rng.normal(0, 1, (n, 4)) * box_noise * height[:, None]
    kp3 = np.concatenate([kp, np.full((n, 17, 1), 0.8)], -1)
    return Poses(torch.from_numpy(b).float(), torch.from_numpy(rng.uniform(0.5, 1.0, n)).float(),
                 torch.from_numpy(kp3).float())


def synthetic_table(seeds: int, people: int, frames: int, weights: list[float]) -> None:
    sigmas = np.array(load_dataset_config("coco").schema.sigmas)
    variants = {name: (lambda name=name: TRACKERS[name](load_tracker_config(name))) for name in TRACKERS}
    for w in weights:
        variants[f"bytetrack + OKS w={w:g}"] = lambda w=w: OksByteTracker(load_tracker_config("bytetrack"), sigmas, w)
    sequences = [synthetic_sequence(people, frames, np.random.default_rng(s)) for s in range(seeds)]
    persons = sum(len(set(np.concatenate([t for t, _ in seq]).tolist())) for seq in sequences)
    print(f"\nsynthetic: {seeds} sequences x {frames} frames, {people} people each ({persons} seen in all), 1280x720")
    print("| association | tracks created | id switches | detections left untracked |")
    print("|---|---|---|---|")
    for name, make in variants.items():
        created = switches = untracked = total = 0
        for seq in sequences:
            tracker = make()
            truth, pred = [], []
            for t_ids, poses in seq:
                truth.append(t_ids)
                pred.append(assign_track_ids(tracker, TrackerInput.from_poses(poses)))
            ids = np.concatenate(pred)
            created += len(set(ids[ids != UNTRACKED].tolist()))
            switches += id_switches(truth, pred)
            untracked += int((ids == UNTRACKED).sum())
            total += len(ids)
        print(f"| {name} | {created} | {switches} | {untracked / max(total, 1):.1%} |")


# ----------------------------------------------------------------------------------------------
def video_timing(video: str, weights: str, imgsz: int, device: str | None, frames: int, tracker: str) -> None:
    """fps of predict vs predict + tracking + smoothing on the video's frames looped to `frames`: in memory
    (the tracking step timed alone) and through the verbs (KAPAO.run with and without tracking, no output)."""
    import tempfile
    from pathlib import Path

    import cv2

    from kapao.cfg.settings import OneEuroSettings
    from kapao.data.sources import VideoReader
    from kapao.infer.predictor import KAPAO

    reader = VideoReader(video)
    fps = reader.fps or 30.0
    clip = [f.image for f in reader]
    reader.close()
    images = [clip[i % len(clip)] for i in range(frames)]
    api = KAPAO(weights, device=device)
    predictor = api.predictor()
    predictor.predict_images(images[:2], imgsz)  # warm-up

    t0 = time.perf_counter()
    plain = [predictor.predict_images([im], imgsz)[0].to("cpu") for im in images]
    t_predict = time.perf_counter() - t0
    step = PoseTracker(tracker, smooth=OneEuroSettings())
    t0 = time.perf_counter()
    for i, (im, poses) in enumerate(zip(images, plain)):
        out = step(poses, i / fps, im)
    t_track = time.perf_counter() - t0
    print(f"\nvideo {video} looped to {frames} frames, imgsz {imgsz}, {api.device}, tracker {tracker} + smoothing")
    print(f"poses per frame: {np.mean([len(p) for p in plain]):.1f}; tracks: {step.tracks_total}; "
          f"ids on the last frame: {out.track_ids.tolist()}")
    print(f"in memory: predict {frames / t_predict:.2f} fps; tracking + smoothing {1000 * t_track / frames:.2f} ms/frame "
          f"= {100 * t_track / (t_predict + t_track):.2f} % of the frame time")

    with tempfile.TemporaryDirectory() as tmp:
        looped = Path(tmp) / "looped.mp4"
        h, w = images[0].shape[:2]
        writer = cv2.VideoWriter(str(looped), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
        for im in images:
            writer.write(im)
        writer.release()
        runs = (("warm-up", None), ("predict", None), ("track", PoseTracker(tracker, smooth=OneEuroSettings())),
                ("predict", None), ("track", PoseTracker(tracker, smooth=OneEuroSettings())))
        for label, tracking in runs:
            run = api.run(str(looped), imgsz=imgsz, save=False, save_json=False, keep_results=False,
                          transforms=[tracking.update_frame] if tracking else ())
            if label != "warm-up":
                print(f"verb {label}: {run.frames} frames, {run.frames / run.seconds:.2f} fps")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=10, help="synthetic sequences")
    ap.add_argument("--people", type=int, default=8)
    ap.add_argument("--synthetic-frames", type=int, default=300)
    ap.add_argument("--oks-weights", type=float, nargs="*", default=[0.25, 0.5])
    ap.add_argument("--video", default=None, help="a video for the timing part (skipped when absent)")
    ap.add_argument("--weights", default="kapao_s_coco")
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--frames", type=int, default=60, help="video frames to time (the video is looped)")
    ap.add_argument("--tracker", default="bytetrack")
    args = ap.parse_args()
    synthetic_table(args.seeds, args.people, args.synthetic_frames, args.oks_weights)
    if args.video:
        video_timing(args.video, args.weights, args.imgsz, args.device, args.frames, args.tracker)


if __name__ == "__main__":
    main()
