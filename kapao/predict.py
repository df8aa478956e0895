"""Inference: the one pre-process -> model -> decode -> NMS -> fusion path, and the `predict` verb.

`Predictor` is shared by predict, val and export checks; `KAPAO` is the Python API the CLI wraps.
"""
from __future__ import annotations

import json
import math
import shutil
import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import cv2
import numpy as np
import torch
from torch import Tensor

from kapao.augment import letterbox
from kapao.config import MAX_STRIDE, PREDICT_SETTINGS, InferenceSettings, KeypointSchema, check_imgsz
from kapao.data import load_image
from kapao.draw import draw_poses
from kapao.errors import ConfigError, DataError, KapaoError
from kapao.postprocess import Poses, postprocess, tta_forward
from kapao.runtime import atomic_write, increment_run_dir, select_device
from kapao.sources import Frame, SourceSpec, VideoReader, count_frames, resolve_source

OFFICIAL_TTA = ((0.8, 1.0, 1.2), (False, True, False))  # scales, left-right flips of the official TTA


# ----------------------------------------------------------------------------------------------
def prepare_batch(images: Sequence[np.ndarray], imgsz: int) -> tuple[Tensor, list[dict[str, Any]]]:
    """BGR images -> letterboxed (B, 3, H, W) uint8 RGB tensor with minimal (rectangular) padding.

    All images of a batch share one shape: the smallest multiple-of-64 rectangle that holds each
    image resized to long side `imgsz`. metas: orig_shape (h, w), ratio (rw, rh), pad (padw, padh).
    """
    shapes = []
    for im in images:
        h, w = im.shape[:2]
        r = imgsz / max(h, w)
        shapes.append((math.ceil(round(h * r) / MAX_STRIDE) * MAX_STRIDE, math.ceil(round(w * r) / MAX_STRIDE) * MAX_STRIDE))
    target = (max(s[0] for s in shapes), max(s[1] for s in shapes))
    batch, metas = [], []
    for im in images:
        out, ratio, pad = letterbox(im, target, auto=False)
        batch.append(out)
        metas.append({"orig_shape": im.shape[:2], "ratio": ratio, "pad": pad})
    arr = np.stack(batch)[..., ::-1].transpose(0, 3, 1, 2)  # BGR HWC -> RGB CHW
    return torch.from_numpy(np.ascontiguousarray(arr)), metas


@dataclass
class Timing:
    """Accumulated seconds of pre-processing, inference and post-processing (NMS + fusion)."""

    pre: float = 0.0
    infer: float = 0.0
    post: float = 0.0
    images: int = 0

    def per_image_ms(self) -> dict[str, float]:
        n = max(self.images, 1)
        return {"pre": 1000 * self.pre / n, "infer": 1000 * self.infer / n, "post": 1000 * self.post / n}

    def summary(self) -> str:
        ms = self.per_image_ms()
        return f"{ms['pre']:.1f} ms pre-process, {ms['infer']:.1f} ms inference, {ms['post']:.1f} ms NMS+fusion per image"


class Predictor:
    """Network input tensor -> list of Poses. Wraps a torch model (or any forward callable)."""

    def __init__(self, forward: Callable[[Tensor], Tensor], schema: KeypointSchema, device: torch.device,
                 settings: InferenceSettings = PREDICT_SETTINGS, half: bool = False,
                 scales: Sequence[float] | None = None, flips: Sequence[bool] | None = None,
                 return_kp_objects: bool = False) -> None:
        from kapao.config import HeadLayout

        if scales and flips and len(scales) != len(flips):
            raise ConfigError(f"--scales has {len(scales)} values but --flips has {len(flips)}; give one flip per scale")
        self.forward, self.schema, self.device = forward, schema, device
        self.layout = HeadLayout(schema.num_keypoints)
        self.settings, self.half = settings, half
        self.scales = list(scales) if scales else ([1.0] * len(flips) if flips else None)
        self.flips = list(flips) if flips else ([False] * len(self.scales) if self.scales else None)
        self.return_kp_objects = return_kp_objects
        self.timing = Timing()

    @classmethod
    def from_model(cls, model: torch.nn.Module, device: torch.device, half: bool = False, fuse: bool = True,
                   **kwargs: Any) -> "Predictor":
        """A predictor over a KapaoModel: eval mode, Conv+BN folded (a copy when fusing), fp16 on CUDA if asked."""
        if half and device.type != "cuda":
            raise ConfigError("--half needs a CUDA device (fp16 is not faster on CPU); drop --half or use --device 0")
        if fuse:
            import copy

            model = copy.deepcopy(model).fuse()
        model = model.to(device).eval()
        model = model.half() if half else model.float()
        return cls(lambda x: model(x)[0], model.schema, device, half=half, **kwargs)

    @contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        setattr(self.timing, name, getattr(self.timing, name) + time.perf_counter() - t0)

    @torch.inference_mode()
    def __call__(self, images: Tensor, metas: Sequence[dict[str, Any]]) -> list[Poses]:
        """images: (B, 3, H, W) uint8 RGB letterboxed network input; metas as from `prepare_batch`."""
        x = images.to(self.device, non_blocking=True)
        x = (x.half() if self.half else x.float()) / 255.0
        with self._timed("infer"):
            if self.scales:
                pred = tta_forward(self.forward, x, self.scales, self.flips, self.layout, self.schema.flip_index)
            else:
                pred = self.forward(x)
        with self._timed("post"):
            out = postprocess(pred.float(), self.settings, self.layout, metas, self.return_kp_objects)
        self.timing.images += len(out)
        return out

    def predict_images(self, images: Sequence[np.ndarray], imgsz: int) -> list[Poses]:
        """BGR images (H, W, 3) -> Poses in their pixels."""
        with self._timed("pre"):
            batch, metas = prepare_batch(images, imgsz)
        return self(batch, metas)


# ----------------------------------------------------------------------------------------------
def image_id_of(frame: Frame) -> int | str:
    """COCO-style id: the frame index for videos, the file stem (as int when numeric) for images."""
    if frame.frame is not None:
        return frame.frame
    stem = Path(frame.path).stem
    return int(stem) if stem.isdigit() else stem


@dataclass
class DrawOptions:
    show_boxes: bool = False
    show_scores: bool = False
    show_kp_objects: bool = False
    line_width: int | None = None
    fused_only: bool = False  # draw only keypoints confirmed by a keypoint object (Poses.fused)


class _VideoSink:
    """Draws and encodes the frames of one output video in a background thread (bounded queue), so that
    drawing and mp4 encoding (OpenCV releases the GIL) overlap the next frame's inference."""

    def __init__(self, writer: cv2.VideoWriter, path: Path, prefetch: int = 8) -> None:
        self.writer, self.path = writer, path
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self.writer.write(job())
                except Exception as e:  # noqa: BLE001 - reported on the main thread by put()/release()
                    self._error = e

    def _check(self) -> None:
        if self._error is not None:
            raise DataError(f"cannot write video {self.path}: {self._error}; check the output folder and free space")

    def put(self, make_image: Callable[[], np.ndarray]) -> None:
        self._check()
        self._queue.put(make_image)

    def release(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self.writer.release()
        self._check()


class ResultWriter:
    """Writes drawn images/videos and a COCO-format predictions JSON into a run folder."""

    def __init__(self, save_dir: Path, schema: KeypointSchema, draw: DrawOptions, save_media: bool = True,
                 show: bool = False) -> None:
        self.save_dir, self.schema, self.draw, self.save_media = save_dir, schema, draw, save_media
        self.show = show
        self.records: list[dict[str, Any]] = []
        self._videos: dict[str, _VideoSink] = {}
        self.written: list[Path] = []

    def add(self, frame: Frame, poses: Poses, fps: float | None = None) -> None:
        for rec in poses.to_coco(image_id_of(frame)):
            rec["file"] = Path(frame.path).name
            self.records.append(rec)
        if not (self.save_media or self.show):
            return
        p = poses.to("cpu")
        if frame.frame is not None and self.save_media and not self.show:  # drawn in the video's thread
            self._video_sink(frame, fps or 30.0).put(lambda: self._draw(frame.image, p))
            return
        img = self._draw(frame.image, p)
        if self.show:
            cv2.imshow("kapao", img)
            cv2.waitKey(1)
        if not self.save_media:
            return
        if frame.frame is None:
            out = self.save_dir / Path(frame.path).name
            if not cv2.imwrite(str(out), img):
                raise DataError(f"cannot write {out}; check that the output folder is writable and has space")
            self.written.append(out)
        else:
            self._video_sink(frame, fps or 30.0).put(lambda: img)

    def _draw(self, image: np.ndarray, p: Poses) -> np.ndarray:
        return draw_poses(image, p.boxes, p.keypoints, self.schema, scores=p.scores, kp_objects=p.kp_objects,
                          line_width=self.draw.line_width, show_boxes=self.draw.show_boxes,
                          show_scores=self.draw.show_scores, show_kp_objects=self.draw.show_kp_objects,
                          kp_threshold=None, keypoint_mask=p.fused if self.draw.fused_only else None)

    def _video_sink(self, frame: Frame, fps: float) -> _VideoSink:
        key = frame.path
        if key not in self._videos:
            name = Path(key).stem if not key.isdigit() else f"webcam{key}"
            out = self.save_dir / f"{name}.mp4"
            h, w = frame.image.shape[:2]
            writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
            if not writer.isOpened():
                raise DataError(f"cannot write video {out}; check that the output folder is writable")
            self._videos[key] = _VideoSink(writer, out)
            self.written.append(out)
        return self._videos[key]

    def close(self) -> Path:
        sinks, self._videos = list(self._videos.values()), {}
        for sink in sinks:
            sink.release()
        if self.show:
            cv2.destroyAllWindows()
        path = self.save_dir / "predictions.json"
        try:
            with atomic_write(path, "w") as f:
                json.dump(self.records, f)
        except OSError as e:
            raise DataError(f"cannot write {path}: {e.strerror or e}; free disk space or use --project with a "
                            "writable folder") from None
        return path


def _display_available() -> str | None:
    """None when a window can be opened, else the reason why not."""
    import os
    import sys

    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return "no display found (DISPLAY is not set)"
    try:
        cv2.namedWindow("kapao", cv2.WINDOW_NORMAL)
        cv2.destroyWindow("kapao")
    except cv2.error:
        return "this OpenCV build has no GUI support (opencv-python-headless is installed)"
    return None


def iter_frames(spec: SourceSpec, readers: dict[str, VideoReader],
                unreadable: list[str] | None = None) -> Iterator[Frame]:
    """Frames of every item of a source: images once, videos/streams frame by frame.

    A reader already in `readers` (opened early) is used as is. An image or video of a folder or glob
    that cannot be read is logged, appended to `unreadable` and skipped, so one bad file never stops the
    run; a lone file that cannot be read raises DataError.
    """
    for item in spec.items:
        try:
            if spec.is_video(item):
                reader = readers.get(item) or VideoReader(item)
                readers[item] = reader
                yield from reader
            else:
                yield Frame(load_image(item), item)
        except DataError as e:
            if len(spec) == 1:
                raise
            from kapao.data import LOGGER

            LOGGER.warning("skipped: %s", e)
            if unreadable is not None:
                unreadable.append(item)


def _batches(frames: Iterator[Frame], batch: int) -> Iterator[list[Frame]]:
    chunk: list[Frame] = []
    for f in frames:
        if chunk and (f.frame is not None) != (chunk[0].frame is not None):  # never mix videos and images
            yield chunk
            chunk = []
        chunk.append(f)
        if len(chunk) == batch or f.frame is not None:  # video frames go one by one (live order)
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclass
class PredictRun:
    """What a predict run produced."""

    save_dir: Path | None
    results: list[Poses] = field(default_factory=list)
    frames: int = 0
    poses: int = 0
    skipped: int = 0  # files that are neither images nor videos (by suffix)
    unreadable: list[str] = field(default_factory=list)  # images/videos that could not be decoded
    seconds: float = 0.0
    timing: Timing | None = None
    json_path: Path | None = None


class KAPAO:
    """Python API: `model = KAPAO("kapao_s_coco"); results = model.predict("img.jpg")`."""

    def __init__(self, weights: str | Path | torch.nn.Module = "kapao_s_coco", device: str | None = None,
                 half: bool = False) -> None:
        from kapao.export import OnnxBackend, is_onnx
        from kapao.weights import load_model

        self.device = select_device(device)
        self.backend: OnnxBackend | None = None
        self.model: torch.nn.Module | None = None
        if isinstance(weights, torch.nn.Module):
            self.model, self.info = weights, {}
        elif is_onnx(weights):
            self.backend = OnnxBackend(weights, device=self.device)
            if half and not self.backend.fp16:
                raise ConfigError(f"--half: {weights} is an fp32 ONNX model; export it with --half (CUDA) or drop --half")
            self.info = {"path": str(weights), "format": "onnx", **self.backend.info.raw}
            self.device, half = self.backend.device, self.backend.fp16
        else:
            self.model, self.info = load_model(weights, device="cpu")
        self.schema: KeypointSchema = self.backend.schema if self.backend else self.model.schema
        self.half = half
        self._fused: Any = None

    @property
    def default_imgsz(self) -> int:
        """1280 (the paper's size), or the input size of a fixed-shape ONNX file."""
        fixed = self.backend.fixed_shape if self.backend else None
        return max(fixed) if fixed else 1280

    def check_imgsz(self, imgsz: int) -> int:
        """A valid --imgsz for this model (a fixed-shape ONNX file accepts no more than its export size)."""
        check_imgsz(imgsz)
        fixed = self.backend.fixed_shape if self.backend else None
        if fixed and imgsz > max(fixed):
            raise ConfigError(f"--imgsz {imgsz}: {self.info['path']} has a fixed {fixed[0]}x{fixed[1]} input; "
                              f"use --imgsz {max(fixed)} or export with --dynamic")
        return imgsz

    def predictor(self, settings: InferenceSettings = PREDICT_SETTINGS, scales: Sequence[float] | None = None,
                  flips: Sequence[bool] | None = None, return_kp_objects: bool = False) -> Predictor:
        if self._fused is None:  # fold Conv+BN once (or open the ONNX session) and reuse it
            self._fused = (Predictor(self.backend, self.schema, self.device, half=self.half) if self.backend
                           else Predictor.from_model(self.model, self.device, self.half))
        return Predictor(self._fused.forward, self.schema, self.device, settings, self.half, scales, flips,
                         return_kp_objects)

    def predict(self, source: str | Path | int | np.ndarray | Sequence[np.ndarray] | None = None, *,
                imgsz: int = 1280, settings: InferenceSettings = PREDICT_SETTINGS, **kwargs: Any) -> list[Poses]:
        """Poses for every image/frame of `source` (a path, folder, glob, video, or BGR arrays), in order."""
        if isinstance(source, np.ndarray) or (isinstance(source, (list, tuple)) and source and isinstance(source[0], np.ndarray)):
            arrays = [source] if isinstance(source, np.ndarray) else list(source)
            return self.predictor(settings, **kwargs).predict_images(arrays, self.check_imgsz(imgsz))
        return self.run(source, imgsz=imgsz, settings=settings, save=False, **kwargs).results

    def run(self, source: str | Path | int | SourceSpec | None = None, *, imgsz: int = 1280,
            settings: InferenceSettings = PREDICT_SETTINGS, scales: Sequence[float] | None = None,
            flips: Sequence[bool] | None = None, batch: int = 1, save: bool = True, save_json: bool = True,
            show: bool = False, draw: DrawOptions | None = None, project: str | Path = "runs/predict",
            name: str = "exp", keep_results: bool = True, progress: bool = False) -> PredictRun:
        """The predict verb: run on a source, write drawn media + predictions.json to runs/predict/expN."""
        from tqdm import tqdm

        self.check_imgsz(imgsz)
        if batch < 1:
            raise ConfigError(f"--batch {batch}: must be at least 1")
        spec = source if isinstance(source, SourceSpec) else resolve_source(source)
        if show and (why := _display_available()):
            raise KapaoError(f"--show: cannot open a window: {why}; drop --show (results are saved to files)")
        draw = draw or DrawOptions()
        predictor = self.predictor(settings, scales, flips, return_kp_objects=draw.show_kp_objects)
        readers: dict[str, VideoReader] = {}
        if len(spec) == 1 and spec.is_video(spec.items[0]):  # a lone video/webcam fails before any output exists
            readers[spec.items[0]] = VideoReader(spec.items[0])
        save_dir = None
        try:
            if save or save_json:
                save_dir = increment_run_dir(project, name)
        except BaseException:
            for r in readers.values():
                r.close()
            raise
        writer = ResultWriter(save_dir, self.schema, draw, save_media=save, show=show) if save_dir or show else None
        run = PredictRun(save_dir, skipped=spec.skipped, timing=predictor.timing)
        total = _total_frames(spec, readers)
        t0 = time.perf_counter()
        bar = tqdm(total=total, unit="frame", disable=not progress, dynamic_ncols=True)
        try:
            for chunk in _batches(iter_frames(spec, readers, run.unreadable), batch):
                results = predictor.predict_images([f.image for f in chunk], imgsz)
                for frame, poses in zip(chunk, results):
                    poses = poses.to("cpu")
                    if writer:
                        fps = readers[frame.path].fps if frame.path in readers else None
                        writer.add(frame, poses, fps)
                    if keep_results:
                        run.results.append(poses)
                    run.poses += len(poses)
                run.frames += len(chunk)
                bar.update(len(chunk))
                bar.set_postfix_str(f"{run.frames / max(time.perf_counter() - t0, 1e-9):.1f} fps, {run.poses} poses")
        finally:
            bar.close()
            for r in readers.values():
                r.close()
            if writer:
                path = writer.close()
                run.json_path = path if save_json else None
                if not save_json:
                    path.unlink()
        run.seconds = time.perf_counter() - t0
        if run.frames == 0:
            if save_dir is not None:  # nothing was produced: leave no empty run folder behind
                shutil.rmtree(save_dir, ignore_errors=True)
            why = f"{len(run.unreadable)} unreadable files" if run.unreadable else "the video has no frames"
            raise DataError(f"no frame could be read from {spec.source} ({why}); check the files (open them in a viewer)")
        return run


def _total_frames(spec: SourceSpec, readers: dict[str, VideoReader]) -> int | None:
    """Frames of a whole source for the progress bar (None for streams); open readers are not reopened."""
    if spec.kind == "stream":
        return None
    counts = [1 if not spec.is_video(i) else readers[i].frame_count if i in readers else count_frames(i)
              for i in spec.items]
    return sum(c or 0 for c in counts)
