"""The `predict` verb and the `KAPAO` Python API the CLI wraps: sources read frame by frame, batched through
the one inference path (:class:`kapao.infer.engine.Predictor`), results to :mod:`kapao.infer.sinks`.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import cv2
import numpy as np
import torch
from tqdm import tqdm

from kapao.backends.dispatch import RuntimeSpec, describe_backend, load_backend
from kapao.backends.int8 import Int8Calibration
from kapao.backends.runtimes import Backend, BackendInfo
from kapao.cfg.schema import KeypointSchema, check_imgsz
from kapao.cfg.settings import PREDICT_SETTINGS, InferenceSettings, OneEuroSettings, settings_from_keywords
from kapao.data.sources import (
    ACCEPTED_INPUTS,
    Frame,
    SourceSpec,
    VideoReader,
    count_frames,
    iter_api_images,
    load_image,
    resolve_source,
)
from kapao.errors import ConfigError, DataError, KapaoError
from kapao.infer.engine import Predictor, Timing
from kapao.infer.options import DrawOptions, OutputOptions, PredictOptions, run_options
from kapao.infer.records import source_name, source_root
from kapao.infer.resume import check_resume, find_resume_run, open_run_dir, read_run_args, source_key, source_text
from kapao.infer.sinks import ResultWriter, Sink
from kapao.poses import Poses
from kapao.weights.registry import native_imgsz

LOGGER = logging.getLogger(__name__)
FrameTransform = Callable[[Frame, Poses], Poses]  # a per-frame step of a predict run (e.g. tracking)


# ----------------------------------------------------------------------------------------------
def _display_available() -> str | None:
    """None when a window can be opened, else the reason why not."""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return "no display found (DISPLAY is not set)"
    try:
        cv2.namedWindow("kapao", cv2.WINDOW_NORMAL)
        cv2.destroyWindow("kapao")
    except cv2.error:
        return "this OpenCV build has no GUI support (opencv-python-headless is installed)"
    return None


def iter_frames(spec: SourceSpec, readers: dict[str, VideoReader], unreadable: list[str] | None = None,
                skip: Callable[[str, int | None], bool] | None = None) -> Iterator[Frame]:
    """Frames of every item of a source: images once, videos/streams frame by frame.

    A reader already in `readers` (opened early) is used as is. An image or video of a folder or glob
    that cannot be read is logged, appended to `unreadable` and skipped, so one bad file never stops the
    run; a lone file that cannot be read raises DataError. `skip(item, frame index or None)` True drops
    an image before it is read, or a video frame after it is decoded (a resumed run's finished work).
    """
    for item in spec.items:
        try:
            if spec.is_video(item):
                reader = readers.get(item) or VideoReader(item)
                readers[item] = reader
                yield from (f for f in reader if skip is None or not skip(item, f.frame))
            elif skip is None or not skip(item, None):
                yield Frame(load_image(item), item)
        except DataError as e:
            if len(spec) == 1:
                raise
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
    json_path: Path | None = None  # predictions.json (built from predictions.jsonl at the end)
    resumed: int = 0  # frames/images a resumed run found already done in its predictions.jsonl


class KAPAO:
    """Python API: `model = KAPAO("kapao_s_coco"); results = model.predict("img.jpg")`.

    ``backend``: auto (weights files on the CPU run through a cached ONNX export, see
    :mod:`kapao.backends.dispatch`), torch, torch-cl, onnxruntime or openvino; ``int8``: run a statically
    quantised model calibrated on these images (:class:`kapao.backends.int8.Int8Calibration`). Together they
    are :attr:`runtime` (:class:`kapao.backends.dispatch.RuntimeSpec`); :attr:`info` says what was loaded
    (:class:`kapao.backends.runtimes.BackendInfo`).
    """

    def __init__(self, weights: str | Path | torch.nn.Module = "kapao_s_coco", device: str | None = None,
                 half: bool = False, backend: str = "auto", int8: Int8Calibration | None = None) -> None:
        self.runtime = RuntimeSpec(device, half, backend, int8)
        self.backend: Backend = load_backend(weights, self.runtime)
        self.info: BackendInfo = self.backend.info
        self.schema: KeypointSchema = self.backend.schema
        self.device, self.half = self.backend.device, self.backend.half

    @property
    def runs_on(self) -> dict[str, str]:
        """What runs the network: backend, precision and device (:func:`kapao.backends.dispatch.describe_backend`)."""
        return describe_backend(self.backend)

    @property
    def default_imgsz(self) -> int:
        """The input size of a fixed-shape ONNX file, else the native size of named weights
        (:data:`kapao.weights.registry.REGISTRY`), else 1280 (the paper's size)."""
        fixed = self.backend.fixed_shape
        return max(fixed) if fixed else native_imgsz(self.info.name)

    def check_imgsz(self, imgsz: int) -> int:
        """A valid --imgsz for this model (a fixed-shape ONNX file accepts no more than its export size)."""
        check_imgsz(imgsz)
        fixed = self.backend.fixed_shape
        if fixed and imgsz > max(fixed):
            raise ConfigError(f"--imgsz {imgsz}: {self.info.path} has a fixed {fixed[0]}x{fixed[1]} input; "
                              f"use --imgsz {max(fixed)} or export with --dynamic")
        return imgsz

    def predictor(self, settings: InferenceSettings = PREDICT_SETTINGS, scales: Sequence[float] | None = None,
                  flips: Sequence[bool] | None = None, return_kp_objects: bool = False) -> Predictor:
        """A predictor with these settings over the backend loaded once (Conv+BN folded, session open)."""
        return Predictor.from_backend(self.backend, settings, scales, flips, return_kp_objects)

    def _keywords(self, verb: str, settings: InferenceSettings, kwargs: dict[str, Any],
                  allowed: Sequence[str]) -> tuple[InferenceSettings, dict[str, Any]]:
        """The threshold keywords (conf=, iou=, conf_kp=, tolerance=, max_det=, …) applied to `settings`, and
        ``half=`` checked against the loaded model (its precision is chosen by ``KAPAO(weights, half=...)``)."""
        settings, rest = settings_from_keywords(settings, kwargs, verb, (*allowed, "half"))
        half = rest.pop("half", None)
        if half is not None and bool(half) != self.half:
            raise ConfigError(f"KAPAO.{verb}(half={half}): the model was loaded in {'fp16' if self.half else 'fp32'}; "
                              f"choose the precision when loading: KAPAO(weights, half={bool(half)})")
        return settings, rest

    def predict(self, source: Any, *, imgsz: int = 1280, settings: InferenceSettings = PREDICT_SETTINGS,
                **kwargs: Any) -> list[Poses]:
        """Poses for every image/frame of `source`, in order: a path, folder, glob, video, stream URL or webcam
        index (str, Path, int), or in-memory images (see :data:`kapao.data.sources.ACCEPTED_INPUTS`: numpy
        H×W / H×W×1/3/4 uint8/uint16 BGR, PIL images, torch tensors, lists or generators of them and of
        paths). A list or tuple goes as one batch; a generator is read one image at a time. `[]` gives `[]`;
        None and other types raise TypeError.

        Keywords as Ultralytics' ``predict``: the thresholds ``conf``, ``iou``, ``max_det``, ``conf_kp``,
        ``iou_kp``, ``conf_kp_person``, ``tolerance``, ``fuse`` (fields of
        :class:`kapao.cfg.settings.InferenceSettings`, applied to `settings`), ``half`` (must match the
        loaded model), and ``scales``, ``flips`` (TTA), ``batch``."""
        settings, kwargs = self._keywords("predict", settings, kwargs, ("scales", "flips", "batch"))
        if isinstance(source, (str, Path, int)) and not isinstance(source, bool):
            return self.run(source, imgsz=imgsz, settings=settings, save=False, keep_results=True, **kwargs).results
        images = iter_api_images(source)  # checks the type before the predictor is built
        first = next(images, None)
        if first is None:
            return []
        kwargs.pop("batch", None)  # in-memory images: a list is one batch, a generator one image at a time
        predictor, imgsz = self.predictor(settings, **kwargs), self.check_imgsz(imgsz)
        groups = [[first, *images]] if isinstance(source, (list, tuple)) else ([i] for i in itertools.chain([first], images))
        return [dataclasses.replace(p.to("cpu"), image=a) for group in groups
                for p, a in zip(predictor.predict_images(group, imgsz), group)]

    def run(self, source: str | Path | int | SourceSpec | None = None, *, options: PredictOptions | None = None,
            output: OutputOptions | None = None, sinks: Sequence[Sink] = (), transforms: Sequence[FrameTransform] = (),
            **keywords: Any) -> PredictRun:
        """The predict verb: run on a source; into runs/predict/expN stream predictions.jsonl (one line per
        frame, as it is made), drawn media, and at the end predictions.json (built from the JSONL).

        options: what is predicted (:class:`kapao.infer.options.PredictOptions`: imgsz, settings, scales,
        flips, batch); output: what is written and where (:class:`kapao.infer.options.OutputOptions`: save,
        save_json, show, draw, project, name, keep_results, progress, resume). Any of their fields may be
        given as a keyword instead (``run(src, imgsz=640, save=False)``); keywords win over the objects.
        keep_results: also keep every frame's Poses in PredictRun.results (memory grows with the run).
        resume: continue a run -- a run folder (or its predictions.jsonl), or True/"latest" (see
        :func:`kapao.infer.resume.find_resume_run`); its SOURCE is used when `source` is None, and its options must match.
        Images and video frames already in its JSONL are skipped, the rest appended.
        sinks: extra :class:`kapao.infer.sinks.Sink` objects fed every frame (e.g. a CSV export).
        transforms: per-frame steps `(frame, poses) -> poses` applied in order before the sinks see the
        poses (e.g. tracking, then smoothing).
        """
        opts, out = run_options(keywords, options, output)
        self.check_imgsz(opts.imgsz)
        if opts.batch < 1:
            raise ConfigError(f"--batch {opts.batch}: must be at least 1")
        if source is None and not out.resume:
            raise TypeError(f"source is None; give {ACCEPTED_INPUTS} (the sample images are only the CLI's default)")
        resume_dir, stored = None, None
        if out.resume:
            resume_dir = find_resume_run(out.resume, out.project, out.name, source_text(source))
            stored = read_run_args(resume_dir)
            source = stored["source"] if source is None else source
        spec = source if isinstance(source, SourceSpec) else resolve_source(source)
        draw = out.draw or DrawOptions()
        args = {**self.run_args(spec, opts), "save": out.save, "draw": dataclasses.asdict(draw),
                "sinks": sorted(type(s).__name__ for s in sinks)}  # what shapes the outputs: a resume keeps it
        if resume_dir is not None and stored is not None:  # read together above
            check_resume(resume_dir, spec, stored, args)
            args["run"] = stored.get("run")
        if out.show and (why := _display_available()):
            raise KapaoError(f"--show: cannot open a window: {why}; drop --show (results are saved to files)")
        return self._run(spec, opts, dataclasses.replace(out, draw=draw), args, resume_dir, sinks, transforms)

    def _run(self, spec: SourceSpec, opts: PredictOptions, out: OutputOptions, args: dict[str, Any],
             resume_dir: Path | None, sinks: Sequence[Sink], transforms: Sequence[FrameTransform]) -> PredictRun:
        """The checked run: open the readers and the run folder (locked), feed the frame loop to the writer, clean up."""
        assert out.draw is not None  # run() fills it in
        predictor = self.predictor(opts.settings, opts.scales, opts.flips, return_kp_objects=out.draw.show_kp_objects)
        readers: dict[str, VideoReader] = {}
        if len(spec) == 1 and spec.is_video(spec.items[0]):  # a lone video/webcam fails before any output exists
            readers[spec.items[0]] = VideoReader(spec.items[0])
        root = source_root(spec)
        names = {source_name(i, root) for i in spec.items} if resume_dir is not None else None
        args.update(self.runs_on)  # what ran, recorded in args.yaml; a resume does not compare it
        save_dir, done, lock = open_run_dir(out.project, out.name, readers, args, resume_dir, out.save or out.save_json,
                                            names)
        try:
            writer = ResultWriter(save_dir, self.schema, out.draw, save_media=out.save, show=out.show,
                                  save_json=out.save_json, root=root, sinks=sinks,
                                  run=args.get("run")) if save_dir or out.show or sinks else None
        except BaseException:
            lock.release()
            raise
        run = PredictRun(save_dir, skipped=spec.skipped, timing=predictor.timing, resumed=done.lines)
        skip = (lambda item, frame: done.done(source_name(item, root), frame)) if done.lines else None
        t0 = time.perf_counter()
        try:
            bar = tqdm(total=_total_frames(spec, readers), initial=done.lines, unit="frame", disable=not out.progress,
                       dynamic_ncols=True)
            frames = iter_frames(spec, readers, run.unreadable, skip)
            _consume(predict_frames(predictor, frames, opts.imgsz, opts.batch, transforms), writer, run,
                     out.keep_results, bar)
        finally:
            try:
                for r in readers.values():
                    r.close()
                if writer:
                    run.json_path = writer.close()
            finally:
                lock.release()
                if run.frames == 0 and resume_dir is None and save_dir is not None:
                    shutil.rmtree(save_dir, ignore_errors=True)  # failed or empty: no run folder that looks like a result
        run.seconds = time.perf_counter() - t0
        if run.frames == 0 and resume_dir is None:
            why = f"{len(run.unreadable)} unreadable files" if run.unreadable else "the video has no frames"
            raise DataError(f"no frame could be read from {spec.source} ({why}); check the files (open them in a viewer)")
        return run

    def track(self, source: str | Path | int | Iterable[np.ndarray] | None = None, *, tracker: str | Path = "bytetrack",
              smooth: OneEuroSettings | None | bool = True, fps: float | None = None, imgsz: int = 1280,
              settings: InferenceSettings = PREDICT_SETTINGS, **kwargs: Any) -> Iterator[Poses]:
        """Poses with `track_ids` for each frame of a video, stream, image sequence or iterable of BGR
        arrays, yielded as they are made (a generator: safe on endless streams; nothing is written).

        tracker: bytetrack, botsort or a tracker YAML; smooth: True (One Euro defaults), a
        kapao.cfg.settings.OneEuroSettings, or False/None for raw keypoints; fps: frame rate of arrays and
        image sequences (videos report their own). Other keywords as for `predict` (scales, flips).
        The frames go through the same loop as `run` (:func:`predict_frames`), tracking as its per-frame step.
        """
        from kapao.track.tracker import PoseTracker

        settings, kwargs = self._keywords("track", settings, kwargs, ("scales", "flips"))
        step = PoseTracker(tracker, OneEuroSettings() if smooth is True else (smooth or None))
        predictor = self.predictor(settings, **kwargs)
        imgsz = self.check_imgsz(imgsz)
        readers: dict[str, VideoReader] = {}
        if source is None or not isinstance(source, (str, Path, int)):
            frames: Iterator[Frame] = (Frame(image, "<arrays>", i, fps) for i, image in enumerate(iter_api_images(source)))
        else:
            frames = (dataclasses.replace(f, fps=fps) if f.frame is None and fps else f
                      for f in iter_frames(resolve_source(source), readers))
        try:
            for chunk in predict_frames(predictor, frames, imgsz, 1, [step.update_frame]):
                yield from (poses for _, poses in chunk)
        finally:
            for r in readers.values():
                r.close()

    def run_args(self, spec: SourceSpec, opts: PredictOptions) -> dict[str, Any]:
        """What a run folder's args.yaml records: the options a resumed run must share."""
        return {"source": source_key(spec.source), "weights": self.info.path, "imgsz": opts.imgsz,
                "int8": self.info.int8, **dataclasses.asdict(opts.settings),
                "scales": [float(v) for v in opts.scales] if opts.scales else None,
                "flips": [bool(v) for v in opts.flips] if opts.flips else None}


def predict_frames(predictor: Predictor, frames: Iterator[Frame], imgsz: int, batch: int,
                   transforms: Sequence[FrameTransform] = ()) -> Iterator[list[tuple[Frame, Poses]]]:
    """The one frame loop of `KAPAO.run` and `KAPAO.track`: batches of frames -> Poses (on the CPU) ->
    transforms in order; yields each batch's (frame, poses) pairs as soon as they are made."""
    for chunk in _batches(frames, batch):
        results = predictor.predict_images([f.image for f in chunk], imgsz)
        out = []
        for frame, poses in zip(chunk, results):
            poses = dataclasses.replace(poses.to("cpu"), path=frame.path, frame=frame.frame)
            for step in transforms:
                poses = step(frame, poses)
            out.append((frame, poses))
        yield out


def _consume(batches: Iterator[list[tuple[Frame, Poses]]], writer: ResultWriter | None, run: PredictRun,
             keep_results: bool, bar: tqdm) -> None:
    """A predict run's end of the loop: every frame's poses to the writer, `run` counts, the progress bar
    (closed at the end)."""
    t0 = time.perf_counter()
    try:
        for chunk in batches:
            for frame, poses in chunk:
                if writer:
                    writer.add(frame, poses)
                if keep_results:  # with the image: plot() needs no file (memory grows with the run anyway)
                    run.results.append(dataclasses.replace(poses, image=frame.image))
                run.poses += len(poses)
            run.frames += len(chunk)
            bar.update(len(chunk))
            bar.set_postfix_str(f"{run.frames / max(time.perf_counter() - t0, 1e-9):.1f} fps, {run.poses} poses")
    finally:
        bar.close()


def _total_frames(spec: SourceSpec, readers: dict[str, VideoReader]) -> int | None:
    """Frames of a whole source for the progress bar (None for streams); open readers are not reopened."""
    if spec.kind == "stream":
        return None
    counts = [1 if not spec.is_video(i) else readers[i].frame_count if i in readers else count_frames(i)
              for i in spec.items]
    return sum(c or 0 for c in counts)
