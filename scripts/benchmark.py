"""Inference speed of kapao (torch eager and onnxruntime) next to Ultralytics YOLO11-pose and YOLO26-pose.

    python scripts/benchmark.py [--sizes n s m] [--imgsz 640 1280] [--device cpu] [--half] [--weights FILE]
                                [--video PATH] [--frames 10] [--runs 5] [--peers yolo11 yolo26]
                                [--pairing 1280 640] [--hot-size s] [--hot-imgsz 256 640 1280] [--hot-conf 0.001]
                                [--no-startup] [--quick]

First the machine's matmul figure: GFLOP/s of a 2048^3 fp32 matmul on the device, measured in this run (and
in bf16 on a CPU with native bf16).
Then, for every size and image size, one row per backend -- kapao torch eager, kapao onnxruntime (the
file `kapao export` writes: static imgsz x imgsz; and --dynamic), on the CPU the other runtimes of
`kapao predict --backend` (FAST_ROWS: torch channels_last, torch bf16 = --half on a CPU with native bf16,
OpenVINO, fixed-shape caches, int8 = --int8), and
each peer (--peers: YOLO11-pose, YOLO26-pose) of the same size (built from its model YAML: random
weights, nothing downloaded) -- with:

* forward ms: median of --runs after warm-up, on the letterboxed first video frame (the input the
  video run uses) and on a crowded image (2x2 tiles of ultralytics' bus.jpg: 16 people);
* post ms: NMS + keypoint fusion on the crowded image's decoded output. Random weights detect
  nothing, so unless --weights is given, realistic candidates are injected into the real decoded
  tensor: per person 20 pose candidates and 4 keypoint-object candidates per keypoint above the
  predict thresholds (the script says so in its output);
* e2e fps: the predict verb on the video (KAPAO(...).run(save=True): decoding, letterbox, forward,
  NMS, fusion, drawing, video writing, predictions.json); YOLO: its own predict(save=False,
  stream=True) on the same video and imgsz;
* frame ms: one video frame to poses on the host -- letterbox, upload, forward, NMS + fusion (on
  the device), results back (kapao: Predictor.predict_images; peers: their predict() of one frame);
* GFLOP/s: the model's FLOPs at the video input shape (kapao: count_flops; peers: ultralytics'
  get_flops, thop) / forward time, and as a percentage of the matmul figure;
* peak memory: CUDA max allocated, else the peak process RSS growth during the row.

Then the published-accuracy pairing (--pairing: kapao-s at 1280 and yolo26s-pose at 640, both published
at 63.0 COCO val2017 AP, measured by different tools), the hot post-processing check (kapao
with its output biases set to objectness 2.0, classes 0.0, so nearly every anchor passes the
thresholds; NMS + fusion vs forward, now and with the previous NMS in tests/infer/reference_nms.py), and
the start-up (fresh processes: `kapao --help`, `kapao predict` of one image with the cache warm) and
the target ratios. --quick: size n at 256 on 2 frames, dynamic ONNX only (a CI smoke run).
The video is --video, else $KAPAO_TEST_DATA/videos/posetrack-000001.mp4 (../shared/data by default),
cut or looped to --frames frames.
"""
from __future__ import annotations

import os

os.environ.setdefault("YOLO_OFFLINE", "1")  # before ultralytics is imported (kapao imports it too)
os.environ.setdefault("YOLO_VERBOSE", "False")
# OpenMP threads sleep instead of spinning when they wait: on a machine shared with other jobs, spinning
# torch threads lose their time slices and eager forward gets up to 4x slower (set it to ACTIVE to compare)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import contextlib
import platform
import socket
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

NETWORK_ATTEMPTS: list[str] = []


def _block_network() -> None:
    """Refuse (and record) every connection or DNS lookup: the benchmark must not download anything."""
    def refuse(what: str) -> Callable[..., Any]:
        def f(*args: Any, **kwargs: Any) -> Any:
            NETWORK_ATTEMPTS.append(f"{what}{args[:2]!r}")
            raise OSError(f"benchmark.py: network access blocked ({what})")
        return f

    socket.socket.connect = refuse("connect")  # type: ignore[method-assign]
    socket.create_connection = refuse("create_connection")  # type: ignore[assignment]
    socket.getaddrinfo = refuse("getaddrinfo")  # type: ignore[assignment]


_block_network()

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import MATMUL_N, REPO, matmul_gflops, median_ms, reference_nms, test_data  # noqa: E402

from kapao.backends.runtimes import Backend as KapaoBackend  # noqa: E402
from kapao.backends.runtimes import OnnxBackend  # noqa: E402
from kapao.cfg.schema import HeadLayout  # noqa: E402
from kapao.cfg.settings import PREDICT_SETTINGS, VAL_SETTINGS, InferenceSettings  # noqa: E402
from kapao.data.sources import default_source, load_image  # noqa: E402
from kapao.errors import KapaoError  # noqa: E402
from kapao.export import export_onnx  # noqa: E402
from kapao.infer import postprocess as pp  # noqa: E402
from kapao.infer.postprocess import postprocess  # noqa: E402
from kapao.infer.predictor import KAPAO, Predictor, prepare_batch  # noqa: E402
from kapao.models.network import build_model, count_flops  # noqa: E402
from kapao.runtime import cpu_bf16, cpu_count, select_device  # noqa: E402

# Person boxes (x1, y1, x2, y2) of ultralytics' bus.jpg (810x1080), for the synthetic crowd.
BUS_PEOPLE = ((50, 400, 245, 905), (670, 380, 810, 875), (220, 405, 345, 860), (0, 550, 63, 873))
# A standing person's 17 COCO keypoints as fractions of the box (x, y).
COCO_TEMPLATE = ((.50, .08), (.54, .06), (.46, .06), (.58, .08), (.42, .08), (.66, .22), (.34, .22), (.72, .40),
                 (.28, .40), (.74, .56), (.26, .56), (.60, .55), (.40, .55), (.60, .76), (.40, .76), (.60, .96),
                 (.40, .96))
POSE_CANDIDATES, KP_CANDIDATES = 20, 4  # injected candidates per person / per keypoint of a person
# Published COCO val2017 keypoint AP of the pairing, each from its own tool: KAPAO's official val.py
# (pycocotools, 1280, README of wmcnally/kapao) and Ultralytics' validator (640, YOLO26 docs).
PAIRING_AP = {"kapao-s": 63.0, "yolo26s-pose": 63.0}
PEERS = {"yolo11": "YOLO11-pose", "yolo26": "YOLO26-pose"}  # ultralytics families: <family><size>-pose.yaml


# ----------------------------------------------------------------------------------------------
# Inputs


def default_video() -> Path:
    return test_data() / "videos" / "posetrack-000001.mp4"


def read_frames(video: Path) -> tuple[list[np.ndarray], float]:
    cap = cv2.VideoCapture(str(video))
    if not cap.isOpened():
        raise SystemExit(f"cannot open video {video}; pass --video or set KAPAO_TEST_DATA")
    fps = cap.get(cv2.CAP_PROP_FPS) or 30.0
    frames = []
    while True:
        ok, img = cap.read()
        if not ok:
            break
        frames.append(img)
    cap.release()
    if not frames:
        raise SystemExit(f"{video} has no readable frames")
    return frames, fps


def make_clip(frames: list[np.ndarray], n: int, fps: float, out: Path) -> Path:
    """The first n frames (looped back and forth when the video is shorter) as an mp4 file."""
    cycle = frames + frames[-2:0:-1] if len(frames) > 1 else frames
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    for i in range(n):
        writer.write(cycle[i % len(cycle)])
    writer.release()
    return out


def crowded_image() -> np.ndarray:
    """2x2 tiles of bus.jpg: 16 people in a 1620x2160 image."""
    bus = load_image(default_source() / "bus.jpg")
    return np.vstack([np.hstack([bus, bus])] * 2)


def crowd_boxes() -> np.ndarray:
    """(16, 4) person boxes of :func:`crowded_image`, its pixels."""
    h, w = 1080, 810
    return np.array([(x1 + dx, y1 + dy, x2 + dx, y2 + dy) for dy in (0, h) for dx in (0, w)
                     for x1, y1, x2, y2 in BUS_PEOPLE], np.float32)


def inject_crowd(pred: torch.Tensor, layout: HeadLayout, meta: dict[str, Any], kp_bbox: float,
                 settings: InferenceSettings, seed: int = 0) -> tuple[torch.Tensor, int, int]:
    """A copy of decoded output (1, N, no) with realistic detections of the crowd's people written over
    random anchors (everything else pushed below the thresholds). Returns (pred, pose candidates,
    keypoint-object candidates) above the thresholds."""
    g = torch.Generator().manual_seed(seed)
    out = pred.clone()
    out[..., layout.obj] = torch.rand(out.shape[:2], generator=g) * 0.05  # background
    (rw, rh), (pw, ph) = meta["ratio"], meta["pad"]
    boxes = torch.from_numpy(crowd_boxes()) * torch.tensor([rw, rh, rw, rh]) + torch.tensor([pw, ph, pw, ph])
    k = layout.num_keypoints
    template = torch.tensor(COCO_TEMPLATE[:k] if k <= 17 else [(.5, .5)] * k)
    n_pose, n_kp = len(boxes) * POSE_CANDIDATES, len(boxes) * k * KP_CANDIDATES
    rows = torch.randperm(out.shape[1], generator=g)[: n_pose + n_kp]
    side = kp_bbox * max(meta["input_shape"])  # keypoint-object side, network-input pixels

    def u(n: int, lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=g)

    # pose candidates: jittered boxes, keypoints from the template, person class
    b = boxes.repeat_interleave(POSE_CANDIDATES, 0)
    wh = b[:, 2:] - b[:, :2]
    jitter = (torch.rand(n_pose, 4, generator=g) - 0.5) * 0.1 * wh.repeat(1, 2)
    b = b + jitter
    r = rows[:n_pose]
    out[0, r, 0:2] = (b[:, :2] + b[:, 2:]) / 2
    out[0, r, 2:4] = b[:, 2:] - b[:, :2]
    out[0, r, layout.obj] = u(n_pose, 0.75, 0.95)
    cls = torch.rand(n_pose, layout.num_classes, generator=g) * 0.05
    cls[:, 0] = u(n_pose, 0.90, 0.99)
    out[0, r, layout.cls] = cls
    kp = b[:, None, :2] + template[None] * (b[:, None, 2:] - b[:, None, :2])
    kp = kp + (torch.rand(kp.shape, generator=g) - 0.5) * 0.04 * wh[:, None]
    out[0, r, layout.kpt] = kp.flatten(1)
    # keypoint objects: small boxes around each keypoint of each person, class k + 1
    centres = (boxes[:, None, :2] + template[None] * (boxes[:, None, 2:] - boxes[:, None, :2])).reshape(-1, 2)
    centres = centres.repeat_interleave(KP_CANDIDATES, 0)
    centres = centres + (torch.rand(centres.shape, generator=g) - 0.5) * side * 0.3
    r = rows[n_pose:]
    out[0, r, 0:2] = centres
    out[0, r, 2:4] = side
    out[0, r, layout.obj] = u(n_kp, 0.6, 0.9)
    cls = torch.rand(n_kp, layout.num_classes, generator=g) * 0.05
    kind = torch.arange(k).repeat_interleave(KP_CANDIDATES).repeat(len(boxes))
    cls[torch.arange(n_kp), kind + 1] = u(n_kp, 0.8, 0.98)
    out[0, r, layout.cls] = cls
    score, c = (out[0, :, layout.cls] * out[0, :, layout.obj, None]).max(-1)
    poses = int(((c == 0) & (score > settings.conf)).sum())
    kps = int(((c > 0) & (score > settings.conf_kp)).sum())
    return out, poses, kps


# ----------------------------------------------------------------------------------------------
# Measuring


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """{'mb': peak CUDA memory allocated, or peak RSS growth of this process} over the block."""
    res = {"mb": float("nan")}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        yield res
        res["mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        return
    import psutil

    proc = psutil.Process()
    start = proc.memory_info().rss
    peak = [start]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.005):
            peak[0] = max(peak[0], proc.memory_info().rss)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield res
    finally:
        stop.set()
        t.join()
        peak[0] = max(peak[0], proc.memory_info().rss)
        res["mb"] = (peak[0] - start) / 2**20


@dataclass
class Row:
    model: str
    backend: str
    imgsz: int
    fwd_video: float = float("nan")  # ms, video frame input
    video_shape: tuple[int, int] = (0, 0)
    fwd_crowd: float = float("nan")  # ms, crowded image input
    crowd_shape: tuple[int, int] = (0, 0)
    post: float = float("nan")  # ms, NMS + fusion on the crowded image
    frame_ms: float = float("nan")  # one video frame to poses on the host (letterbox .. results back)
    gflops: float = float("nan")  # model GFLOPs at video_shape
    fps: float = float("nan")  # end to end on the video
    other_ms: float = float("nan")  # per frame outside pre/forward/post (decode, draw, write)
    mem_mb: float = float("nan")
    notes: list[str] = field(default_factory=list)

    @property
    def post_ratio(self) -> float:
        return self.post / self.fwd_crowd

    @property
    def fps_ratio(self) -> float:
        return self.fps * self.fwd_video / 1000

    @property
    def gflops_per_s(self) -> float:
        return self.gflops / (self.fwd_video / 1000)


@dataclass
class Context:
    args: argparse.Namespace
    device: torch.device
    frames: list[np.ndarray]
    clip: Path
    crowd: np.ndarray
    tmp: Path
    project: Path
    matmul: float = float("nan")  # GFLOP/s of the machine figure
    matmul_bf16: float = float("nan")  # the same in bf16 (CPUs with native bf16)
    notes: list[str] = field(default_factory=list)


Backend = tuple[str, Callable[[torch.Tensor], torch.Tensor], "KapaoBackend | None", "Path | None"]
# The runtimes `kapao predict --backend` chooses from on the CPU (kapao.backends.dispatch):
# (label, --backend, shapes, precision: fp32, int8 or bf16 = --half on a CPU with native bf16). Their exports go
# to a cache folder under the run's temp dir, not timed. scripts/benchmark_backends.py measures the same rows
# without the end-to-end runs.
FAST_ROWS = (
    ("torch channels_last", "torch-cl", "dynamic", "fp32"),
    ("torch bf16 (--half)", "auto", "dynamic", "bf16"),
    ("openvino dynamic", "openvino", "dynamic", "fp32"),
    ("openvino fixed-shape cache", "openvino", "fixed", "fp32"),
    ("onnxruntime fixed-shape cache", "onnxruntime", "fixed", "fp32"),
    ("onnxruntime int8 dynamic (--int8)", "onnxruntime", "dynamic", "int8"),
    ("onnxruntime int8 fixed-shape cache", "onnxruntime", "fixed", "int8"),
)
STARTUP_RUNS = 3  # fresh processes per start-up timing (median)
INT8_CALIB_IMAGES = 4  # coco-mini's four images, as in the issue's int8 measurement


def kapao_api(model: torch.nn.Module, device: torch.device, backend: KapaoBackend | None, onnx: Path | None,
              half: bool = False) -> KAPAO:
    """The KAPAO API over the torch model, or over the row's backend (the predictor's forward)."""
    api = KAPAO(model, device=str(device), half=half, backend="torch")
    if backend is not None:
        api.backend = backend
    return api


def fast_backends(ctx: Context, model: torch.nn.Module, imgsz: int) -> list[Backend]:
    """The FAST_ROWS backends (CPU only; a runtime that is not installed is noted and skipped)."""
    from kapao.backends.dispatch import RuntimeSpec, load_backend
    from kapao.backends.int8 import Int8Calibration

    os.environ.setdefault("KAPAO_CACHE_DIR", str(ctx.tmp / "kapao-cache"))
    calib = Int8Calibration.from_spec(test_data() / "coco-mini" / "images", imgsz, INT8_CALIB_IMAGES)
    rows: list[Backend] = []
    for label, name, shapes, precision in FAST_ROWS:
        if precision == "bf16" and not cpu_bf16():
            ctx.notes.append(f"{label} skipped: this CPU has no native bf16")
            continue
        try:
            spec = RuntimeSpec("cpu", half=precision == "bf16", backend=name, int8=calib if precision == "int8" else None)
            be = load_backend(model, spec, shapes=shapes)
        except KapaoError as e:
            ctx.notes.append(f"{label} skipped: {e}")
            continue
        rows.append((label, be, be, None))
    return rows


def kapao_backends(ctx: Context, model: torch.nn.Module, size: str, imgsz: int, torch_only: bool = False
                   ) -> list[Backend]:
    """The kapao backends to measure, one row each: (label, forward, OnnxBackend or None, ONNX path or None)."""
    args, device = ctx.args, ctx.device
    backends: list[Backend] = [("torch eager" + (" fp16" if args.half else ""),
                                Predictor.from_model(model, device, half=args.half).forward, None, None)]
    if torch_only or args.no_onnx or args.half:
        return backends
    for dynamic in ([True] if args.quick else [False, True]):
        path = export_onnx(model, ctx.tmp / f"{size}_{imgsz}_{'dyn' if dynamic else 'static'}.onnx", imgsz=imgsz,
                           dynamic=dynamic, simplify=args.simplify, check=False, device="cpu")
        be = OnnxBackend(path, device=device)
        label = ("onnxruntime dynamic" if dynamic else f"onnxruntime {imgsz}x{imgsz}") + \
            (" slim" if args.simplify else "")
        backends.append((label, be, be, path))
    if device.type == "cpu" and not args.quick:
        backends += fast_backends(ctx, model, imgsz)
    return backends


def kapao_flops(model: torch.nn.Module, shape: tuple[int, int]) -> float:
    try:
        return count_flops(model, shape)
    except KapaoError:  # a shape count_flops cannot scale to exactly
        return float("nan")


def kapao_rows(ctx: Context, size: str, imgsz: int, torch_only: bool = False) -> list[Row]:
    args, device = ctx.args, ctx.device
    if args.weights:
        from kapao.weights.loader import load_model

        model, _ = load_model(args.weights)
        name = f"kapao-{model.size} ({Path(args.weights).name})"
    else:
        torch.manual_seed(0)
        model = build_model(size).eval()
        name = f"kapao-{size}"
    layout, schema = model.layout, model.schema
    xv, _ = prepare_batch(ctx.frames[:1], imgsz)
    xc, metas = prepare_batch([ctx.crowd], imgsz)
    metas[0]["input_shape"] = tuple(xc.shape[-2:])
    rows = []
    for label, forward, backend, path in kapao_backends(ctx, model, size, imgsz, torch_only):
        row = Row(name, label, imgsz)
        dev = backend.device if backend is not None else device
        sync = dev.type == "cuda"
        half = args.half and backend is None
        with peak_memory(device) as mem, torch.inference_mode():
            x_video = xv.to(dev).half() / 255 if half else xv.to(dev).float() / 255
            x_crowd = xc.to(dev).half() / 255 if half else xc.to(dev).float() / 255
            row.video_shape, row.crowd_shape = tuple(xv.shape[-2:]), tuple(xc.shape[-2:])
            if backend is not None and backend.fixed_shape:
                row.video_shape = row.crowd_shape = backend.fixed_shape  # padded to it
            row.gflops = kapao_flops(model, row.video_shape)
            row.fwd_video = median_ms(lambda: forward(x_video), args.runs, args.warmup, sync)
            row.fwd_crowd = median_ms(lambda: forward(x_crowd), args.runs, args.warmup, sync)
            pred = forward(x_crowd).float()
            if not args.weights:
                pred, n_pose, n_kp = inject_crowd(pred.cpu(), layout, metas[0], schema.kp_bbox, PREDICT_SETTINGS)
                pred = pred.to(dev)
                note = (f"post ms: synthetic decoded output (random weights): 16 people, {POSE_CANDIDATES} pose "
                        f"candidates per person and {KP_CANDIDATES} keypoint-object candidates per keypoint (scores "
                        "mostly above the predict thresholds) injected into the crowded image's real decoded tensor")
                if note not in ctx.notes:
                    ctx.notes.append(note)
                row.notes.append(f"{n_pose} pose + {n_kp} keypoint-object candidates above threshold")
            found = postprocess(pred, PREDICT_SETTINGS, layout, metas)[0]
            row.post = median_ms(lambda: postprocess(pred, PREDICT_SETTINGS, layout, metas), args.runs, args.warmup,
                                 sync)
            row.notes.append(f"{len(found)} poses, {int(found.fused.sum())} fused keypoints")
            api = kapao_api(model, device, backend, path, half)
            predictor = api.predictor()
            row.frame_ms = median_ms(lambda: [p.to("cpu") for p in predictor.predict_images(ctx.frames[:1], imgsz)],
                                     args.runs, args.warmup, sync)
            api.predict(ctx.frames[0], imgsz=imgsz)  # warm-up at the video's input shape
            run = api.run(str(ctx.clip), imgsz=imgsz, save=True, project=ctx.project, name=f"{size}_{imgsz}",
                          keep_results=False)
        row.mem_mb = mem["mb"]
        row.fps = run.frames / run.seconds
        t = run.timing.per_image_ms()
        row.other_ms = 1000 / row.fps - t["pre"] - t["infer"] - t["post"]
        row.notes.append(f"in the video run per frame: {t['pre']:.1f} pre-process, {t['infer']:.1f} forward, "
                         f"{t['post']:.1f} post, {row.other_ms:.1f} other ms ({run.poses} poses drawn)")
        rows.append(row)
    return rows


def yolo_row(ctx: Context, family: str, size: str, imgsz: int) -> Row:
    """One ultralytics peer (`family` in PEERS), built from its YAML: random weights, no download."""
    from ultralytics import YOLO
    from ultralytics.utils.torch_utils import get_flops

    row = Row(f"{family}{size}-pose", "ultralytics" + (" fp16" if ctx.args.half else ""), imgsz)
    dev = "cpu" if ctx.device.type == "cpu" else str(ctx.device.index or 0)
    with peak_memory(ctx.device) as mem:
        model = YOLO(f"{family}{size}-pose.yaml")
        kw = dict(imgsz=imgsz, device=dev, save=False, verbose=False, half=ctx.args.half)
        model.predict(ctx.frames[0], **kw)  # sets up (and warms up) its predictor
        predictor = model.predictor
        sync = ctx.device.type == "cuda"
        with torch.inference_mode():
            xv = predictor.preprocess([ctx.frames[0]])
            xc = predictor.preprocess([ctx.crowd])
            row.video_shape, row.crowd_shape = tuple(xv.shape[-2:]), tuple(xc.shape[-2:])
            row.fwd_video = median_ms(lambda: predictor.model(xv), ctx.args.runs, ctx.args.warmup, sync)
            row.fwd_crowd = median_ms(lambda: predictor.model(xc), ctx.args.runs, ctx.args.warmup, sync)
        row.gflops = get_flops(model.model, list(row.video_shape)) or float("nan")
        row.frame_ms = median_ms(lambda: [r.cpu() for r in model.predict(ctx.frames[0], **kw)], ctx.args.runs,
                                 ctx.args.warmup, sync)
        t0 = time.perf_counter()
        frames, speeds = 0, []
        for r in model.predict(str(ctx.clip), stream=True, **kw):
            frames += 1
            speeds.append(r.speed)
        row.fps = frames / (time.perf_counter() - t0)
    row.mem_mb = mem["mb"]
    row.post = float("nan")  # its NMS on random weights says nothing; see notes
    pre = statistics.median(s["preprocess"] for s in speeds)
    inf = statistics.median(s["inference"] for s in speeds)
    post = statistics.median(s["postprocess"] for s in speeds)
    row.other_ms = 1000 / row.fps - pre - inf - post
    row.notes.append(f"its own timing per frame: {pre:.1f} pre, {inf:.1f} inference, {post:.1f} post ms")
    return row


# ----------------------------------------------------------------------------------------------
# Hot post-processing: nearly every anchor above the thresholds


HOT_RUNS = 9  # timed runs (median) of the hot check, whatever --runs says


def hot_postprocessing(ctx: Context, size: str, imgsz: int) -> list[str]:
    """kapao-<size> with objectness bias 2.0 and class biases 0.0 on the first video frame at imgsz: candidates
    per frame, NMS + fusion ms with the current and the previous NMS, forward ms; markdown table lines."""
    from unittest import mock

    ref = reference_nms()

    args, device, sync = ctx.args, ctx.device, ctx.device.type == "cuda"
    torch.manual_seed(0)
    model = ref.set_hot_biases(build_model(size).eval())
    predictor = Predictor.from_model(model, device, half=args.half)
    x, metas = prepare_batch(ctx.frames[:1], imgsz)
    x = x.to(device)
    x = x.half() / 255 if args.half else x.float() / 255
    lines = ["| setting | candidates / frame (poses + keypoint objects) | forward ms: torch / default backend | "
             "NMS + fusion ms | post / forward: torch / default | previous NMS: NMS + fusion ms | post / torch forward | "
             "same poses |", "|" + "---|" * 8]
    with torch.inference_mode():
        runs = max(args.runs, HOT_RUNS)  # cheap next to the table; a noisy VM needs more than 5
        fwd = median_ms(lambda: predictor.forward(x), runs, args.warmup, sync)
        fwd_default = fwd  # the default backend is torch off the CPU
        if device.type == "cpu" and not args.no_onnx:
            from kapao.backends.dispatch import DEFAULT_CPU_BACKEND, RuntimeSpec, load_backend

            os.environ.setdefault("KAPAO_CACHE_DIR", str(ctx.tmp / "kapao-cache"))
            # what `kapao predict` runs for a .pt on the CPU (an in-memory model's `auto` would be torch)
            default = load_backend(model, RuntimeSpec("cpu", backend=DEFAULT_CPU_BACKEND))
            fwd_default = median_ms(lambda: default(x), runs, args.warmup, sync)
        pred = predictor.forward(x).float()
        layout = model.layout
        score, cls = (pred[..., layout.cls] * pred[..., layout.obj, None]).max(-1)
        obj = pred[..., layout.obj]
        for label, settings in ((f"conf {args.hot_conf} / conf-kp {args.hot_conf}",
                                 PREDICT_SETTINGS.replace(conf=args.hot_conf, conf_kp=args.hot_conf)),
                                ("val thresholds (conf 0.001 / conf-kp 0.2)", VAL_SETTINGS)):
            n_pose = int(((obj > settings.conf) & (score > settings.conf) & (cls == 0)).sum())
            n_kp = int(((obj > settings.conf_kp) & (score > settings.conf_kp) & (cls > 0)).sum())
            new = postprocess(pred, settings, layout, metas)[0]
            post = median_ms(lambda: postprocess(pred, settings, layout, metas), runs, args.warmup, sync)
            with mock.patch.object(pp, "nms", ref.nms):
                old = postprocess(pred, settings, layout, metas)[0]
                post_old = median_ms(lambda: postprocess(pred, settings, layout, metas), runs, args.warmup, sync)
            same = torch.equal(new.scores, old.scores) and torch.equal(new.boxes, old.boxes) and \
                torch.equal(new.keypoints, old.keypoints)
            same_scores = torch.equal(new.scores, old.scores)
            verdict = "identical" if same else ("same scores, equal scores reordered" if same_scores else "DIFFERENT")
            lines.append(f"| {label} | {n_pose + n_kp} ({n_pose} + {n_kp}) | {fwd:.1f} / {fwd_default:.1f} | {post:.1f} | "
                         f"{100 * post / fwd:.1f} % / {100 * post / fwd_default:.1f} % | {post_old:.1f} | "
                         f"{100 * post_old / fwd:.1f} % | {verdict} |")
    return lines


def startup_lines(ctx: Context) -> list[str]:
    """Wall seconds of `kapao --help` and of `kapao predict <one coco-mini image>` (kapao-s checkpoint, default
    backend, cache warmed by one untimed run) in fresh processes: markdown table lines."""
    import subprocess
    import sys

    from kapao.weights.checkpoint import save_checkpoint

    torch.manual_seed(0)
    weights = ctx.tmp / "kapao_s_startup.pt"
    save_checkpoint(weights, build_model("s"))
    image = sorted((test_data() / "coco-mini" / "images").glob("*.jpg"))[0]
    env = {**os.environ, "PYTHONPATH": str(REPO), "KAPAO_CACHE_DIR": str(ctx.tmp / "kapao-cache")}
    cmds = {"kapao --help": ["--help"],
            f"kapao predict {image.name} (default backend)": ["predict", str(image), "--weights", str(weights),
                                                             "--project", str(ctx.tmp / "startup")]}
    lines = ["| command | wall s |", "|---|---:|"]
    for label, argv in cmds.items():
        cmd = [sys.executable, "-m", "kapao", *argv]
        subprocess.run(cmd, env=env, capture_output=True, check=True)  # warms the exported-model cache
        walls = []
        for _ in range(STARTUP_RUNS):
            t0 = time.perf_counter()
            subprocess.run(cmd, env=env, capture_output=True, check=True)
            walls.append(time.perf_counter() - t0)
        lines.append(f"| {label} | {statistics.median(walls):.2f} |")
    return lines


# ----------------------------------------------------------------------------------------------
# Report


def fmt(v: float, spec: str = ".1f") -> str:
    return "–" if v != v else format(v, spec)


def table(rows: list[Row], matmul: float) -> str:
    head = ("| model | backend | forward ms (video input) | forward ms (crowded input) | post ms (crowded) | "
            "post / forward | frame ms | GFLOP/s (% of matmul) | e2e fps (video) | e2e fps x forward | "
            "other ms/frame | peak mem MB |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r.model} @{r.imgsz} | {r.backend} | {fmt(r.fwd_video)} ({r.video_shape[0]}x{r.video_shape[1]}) | "
            f"{fmt(r.fwd_crowd)} ({r.crowd_shape[0]}x{r.crowd_shape[1]}) | {fmt(r.post)} | "
            f"{fmt(100 * r.post_ratio, '.2f')} % | {fmt(r.frame_ms)} | {fmt(r.gflops_per_s, '.0f')} "
            f"({fmt(100 * r.gflops_per_s / matmul, '.0f')} %) | {fmt(r.fps, '.2f')} | {fmt(r.fps_ratio, '.2f')} | "
            f"{fmt(r.other_ms)} | {fmt(r.mem_mb, '.0f')} |")
    return "\n".join(lines)


def pairing(rows: list[Row], kapao_imgsz: int, yolo_imgsz: int) -> list[str]:
    """The published-accuracy pairing: kapao-s at kapao_imgsz vs yolo26s-pose at yolo_imgsz."""
    k = next((r for r in rows if r.model == "kapao-s" and r.imgsz == kapao_imgsz
              and r.backend.startswith("torch")), None)
    y = next((r for r in rows if r.model == "yolo26s-pose" and r.imgsz == yolo_imgsz), None)
    if k is None or y is None:
        return ["- (pairing rows missing)"]
    out = [f"- published COCO val2017 AP: kapao-s @{kapao_imgsz} {PAIRING_AP['kapao-s']} (official KAPAO val.py, "
           f"pycocotools) and yolo26s-pose @{yolo_imgsz} {PAIRING_AP['yolo26s-pose']} (Ultralytics' validator): "
           "different tools, so equal numbers are not a measured tie"]
    for what, a, b, unit in (("forward (video input)", k.fwd_video, y.fwd_video, "ms"),
                             ("frame to poses", k.frame_ms, y.frame_ms, "ms"),
                             ("e2e video", k.fps, y.fps, "fps"),
                             ("GFLOPs at the video input", k.gflops, y.gflops, ""),
                             ("GFLOP/s achieved", k.gflops_per_s, y.gflops_per_s, "")):
        out.append(f"- {what}: kapao-s {fmt(a, '.1f')} vs yolo26s-pose {fmt(b, '.1f')}{' ' + unit if unit else ''} "
                   f"(kapao / yolo = {fmt(a / b, '.2f')})")
    return out


def targets(rows: list[Row], peers: list[str]) -> list[str]:
    out = []

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    for (model, imgsz) in dict.fromkeys((r.model, r.imgsz) for r in rows if r.model.startswith("kapao")):
        group = {r.backend: r for r in rows if r.model == model and r.imgsz == imgsz}
        eager = next((r for name, r in group.items() if name.startswith("torch")), None)
        if eager is None:
            continue
        size = model.split("-")[1][0]
        tag = f"{model} @{imgsz}"
        out.append(f"- {tag}: post-processing / forward (crowded image, torch) = {100 * eager.post_ratio:.2f} % "
                   f"(target <= 5 %: {verdict(eager.post_ratio <= 0.05)})")
        out.append(f"- {tag}: e2e fps / (1 / forward) (video, torch) = {eager.fps_ratio:.2f} "
                   f"(target >= 0.9: {verdict(eager.fps_ratio >= 0.9)})")
        for name, r in group.items():
            if name.startswith("onnxruntime"):
                (h, w), (th, tw) = r.video_shape, eager.video_shape
                inputs = "same input" if (h, w) == (th, tw) else f"{h}x{w} vs {th}x{tw}"
                ratio = r.fwd_video / eager.fwd_video
                out.append(f"- {tag}: {name} forward / torch forward = {ratio:.2f} ({inputs}; "
                           f"target <= 0.8 for s @640: {verdict(ratio <= 0.8)})")
        for family in peers:
            peer = next((r for r in rows if r.model == f"{family}{size}-pose" and r.imgsz == imgsz), None)
            if peer is not None:
                for name, r in group.items():
                    out.append(f"- {tag}: e2e fps {name} / {peer.model} = {r.fps / peer.fps:.2f} "
                               f"(target >= 1: {verdict(r.fps >= peer.fps)})")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["n", "s", "m"], choices=["n", "s", "m", "l", "x"])
    ap.add_argument("--imgsz", type=int, nargs="+", default=[640, 1280])
    ap.add_argument("--device", default="cpu", help="cpu, 0, … (default cpu)")
    ap.add_argument("--half", action="store_true", help="fp16 torch and peers (CUDA only); skips onnxruntime")
    ap.add_argument("--weights", default=None, help="real kapao weights (one size): post-processing on real outputs")
    ap.add_argument("--video", type=Path, default=None)
    ap.add_argument("--frames", type=int, default=10, help="video frames for the end-to-end runs")
    ap.add_argument("--runs", type=int, default=5, help="timed forward / post-processing runs (median)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-onnx", action="store_true", help="skip the onnxruntime rows")
    ap.add_argument("--simplify", action="store_true", help="export the ONNX files with --simplify (onnxslim)")
    ap.add_argument("--peers", nargs="*", default=list(PEERS), choices=list(PEERS),
                    help="ultralytics peers built from YAML (default: all; none: --peers with no value)")
    ap.add_argument("--no-yolo", action="store_true", help="skip the peer rows (same as --peers with no value)")
    ap.add_argument("--pairing", type=int, nargs=2, default=[1280, 640], metavar=("KAPAO_IMGSZ", "YOLO26_IMGSZ"),
                    help="the published-accuracy pairing: kapao-s and yolo26s-pose image sizes (default 1280 640)")
    ap.add_argument("--no-pairing", action="store_true", help="skip the published-accuracy pairing")
    ap.add_argument("--hot-size", default="s", choices=["n", "s", "m", "l", "x"],
                    help="kapao size of the hot post-processing check (default s)")
    ap.add_argument("--hot-imgsz", type=int, nargs="+", default=[1280],
                    help="image sizes of the hot check (default 1280)")
    ap.add_argument("--hot-conf", type=float, default=0.3, help="conf and conf-kp of the hot check (default 0.3)")
    ap.add_argument("--no-hot", action="store_true", help="skip the hot post-processing check")
    ap.add_argument("--no-startup", action="store_true", help="skip the start-up timings")
    ap.add_argument("--project", type=Path, default=None, help="folder for the run outputs (default: a temp dir)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: size n, imgsz 256, 2 frames, 2 runs, no pairing, no start-up, hot check n @256")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.imgsz, args.frames, args.runs, args.warmup = ["n"], [256], 2, 2, 1
        args.no_pairing, args.hot_size, args.hot_imgsz, args.no_startup = True, "n", [256], True
    if args.no_yolo:
        args.peers = []
    if args.weights:
        args.sizes = ["?"]
    device = select_device(args.device)
    if args.half and device.type != "cuda":
        raise SystemExit("--half needs a CUDA device (--device 0)")
    threads = cpu_count(physical=True)
    torch.set_num_threads(threads)
    video = args.video or default_video()
    frames, fps = read_frames(video)
    with tempfile.TemporaryDirectory(prefix="kapao-bench-") as tmp:
        tmp = Path(tmp)
        project = args.project or tmp / "runs"
        clip = make_clip(frames, args.frames, fps, tmp / f"{video.stem}.mp4")
        ctx = Context(args, device, frames, clip, crowded_image(), tmp, project)
        ctx.matmul = matmul_gflops(device, args.runs, args.warmup)
        if device.type == "cpu" and cpu_bf16():
            ctx.matmul_bf16 = matmul_gflops(device, args.runs, args.warmup, torch.bfloat16)
        rows: list[Row] = []
        for imgsz in args.imgsz:
            for size in args.sizes:
                rows += kapao_rows(ctx, size, imgsz)
                if size != "?":
                    rows += [yolo_row(ctx, family, size, imgsz) for family in args.peers]
                print(f"done: {size} @{imgsz}", flush=True)
        if not args.no_pairing:
            k_imgsz, y_imgsz = args.pairing
            if not any(r.model == "kapao-s" and r.imgsz == k_imgsz for r in rows):
                rows += kapao_rows(ctx, "s", k_imgsz, torch_only=True)
            if not any(r.model == "yolo26s-pose" and r.imgsz == y_imgsz for r in rows):
                rows.append(yolo_row(ctx, "yolo26", "s", y_imgsz))
            print("done: pairing", flush=True)
        hot = {} if args.no_hot else {i: hot_postprocessing(ctx, args.hot_size, i) for i in args.hot_imgsz}
        startup = [] if args.no_startup else startup_lines(ctx)
    cpu = platform.processor() or platform.machine()
    load = ", load average " + " ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else ""
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"\n## kapao inference benchmark — {device}{gpu} ({cpu}, {threads} threads, OMP_WAIT_POLICY="
          f"{os.environ['OMP_WAIT_POLICY']}{load}), torch {torch.__version__}\n")
    bf16_line = f"; bf16 matmul = {ctx.matmul_bf16:.0f} GFLOP/s" if ctx.matmul_bf16 == ctx.matmul_bf16 else ""
    print(f"machine figure: {MATMUL_N}^3 fp32 matmul = {ctx.matmul:.0f} GFLOP/s on {device} (median of "
          f"{args.runs}){bf16_line}\n")
    print(f"video: {video.name} {frames[0].shape[1]}x{frames[0].shape[0]}, {args.frames} frames; forward: median of "
          f"{args.runs} after {args.warmup} warm-up; crowded image: 2x2 bus.jpg (16 people)"
          + ("; fp16" if args.half else "") + "\n")
    print(table(rows, ctx.matmul))
    print("\nNotes:")
    for n in ctx.notes:
        print(f"- {n}")
    print("- e2e: kapao = KAPAO.run(save=True) incl. drawing, mp4 writing and predictions.json; YOLO = its "
          "predict(save=False); 'other ms/frame' = 1000/fps minus pre-process + forward + post per frame (video "
          "decoding, drawing, writing, start-up); random weights find no poses on the video, so nothing is drawn "
          "(16 poses at 720p cost about 4 ms to draw)")
    print("- frame ms: one decoded video frame to poses on the host: letterbox, upload, forward, NMS + fusion on the "
          "device, results copied back (peers: their predict() of the frame, results .cpu())")
    print("- GFLOP/s: FLOPs (2 x multiply-accumulates) at the video input shape / forward ms; kapao counts its "
          "Conv2d layers (count_flops), peers use ultralytics' get_flops (thop)")
    mem = "CUDA max allocated" if device.type == "cuda" else "growth of the process RSS during the row"
    print(f"- peak mem: {mem}")
    for r in rows:
        if r.notes:
            print(f"- {r.model} @{r.imgsz} {r.backend}: {'; '.join(r.notes)}")
    print(f"- network access attempts: {len(NETWORK_ATTEMPTS)}" + (f" ({', '.join(NETWORK_ATTEMPTS[:3])})"
                                                                      if NETWORK_ATTEMPTS else ""))
    if not args.no_pairing:
        print("\nPublished-accuracy pairing:")
        for line in pairing(rows, *args.pairing):
            print(line)
    for hot_imgsz, lines in hot.items():
        print(f"\nHot post-processing (kapao-{args.hot_size} @{hot_imgsz}, output biases objectness 2.0 / "
              f"classes 0.0, random weights, first video frame; medians of {max(args.runs, HOT_RUNS)} runs; "
              "target: NMS + fusion <= 25 % of the default forward at the val thresholds):\n")
        print("\n".join(lines))
        print("\n'same poses': boxes, scores and fused keypoints bitwise equal to the previous NMS; 'equal scores "
              "reordered': same score sequence, exactly equal scores in input order instead of torchvision's "
              "unstable-sort order")
    if startup:
        print(f"\nStart-up (wall seconds of a fresh process, median of {STARTUP_RUNS}; the exported-model cache "
              "warm; kapao-s, random weights):\n")
        print("\n".join(startup))
    print("\nTargets (ratios from this run):")
    for line in targets(rows, args.peers):
        print(line)


if __name__ == "__main__":
    main()
