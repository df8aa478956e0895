"""predict and track on many processes (torchrun): the work split by rank, one JSONL part per rank, and
the parts merged into the run's predictions.jsonl / predictions.json in a single process's order.

* **Units.** The items of SOURCE (sorted, as :func:`kapao.data.sources.resolve_source` lists them) are
  cut into units no rank splits: a video (its frames in order); consecutive images in chunks of
  ``--batch``, as one process batches them (a batch's letterbox shape depends on its members); for
  ``track`` all images together (they form one tracked sequence).
* **Plan.** Rank 0 gives each rank a contiguous run of units, balanced by frames still to do, and
  broadcasts it with the run folder. Ranks write ``parts/SSS-RRRR.jsonl`` (session SSS, rank RRRR) in
  the JSONL format of :mod:`kapao.infer.sinks`, and draw into the run folder itself.
* **Merge.** When every rank finished, rank 0 merges the parts (and a predictions.jsonl already there)
  by (item index, frame): each part is in that order, so a streaming k-way merge gives exactly the
  lines one process writes. Then predictions.json, extra sinks (``--save-csv``) replayed from the merged
  JSONL, and the parts are removed. When any rank fails nothing is merged; the parts stay.
* **Resume.** A resumed run reads every part (and predictions.jsonl) for what is done and re-shards the
  rest over the processes it now has, any number of them (a new session of parts), so a killed rank's
  work is finished by whoever gets it; every frame ends up once.
"""
from __future__ import annotations

import dataclasses
import heapq
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from tqdm import tqdm

from kapao.data.sources import Frame, SourceSpec, VideoReader, count_frames
from kapao.distributed import DistEnv, RankStopped, agree, broadcast, check_stop, gather, signal_error
from kapao.errors import ConfigError, DataError, UsageError
from kapao.infer.options import DrawOptions, OutputOptions, PredictOptions
from kapao.infer.predictor import KAPAO, FrameTransform, PredictRun, iter_frames, predict_frames
from kapao.infer.records import (
    PREDICTIONS_JSON,
    PREDICTIONS_JSONL,
    poses_from_records,
    read_records,
    source_name,
    source_root,
    write_coco_json,
)
from kapao.infer.resume import (
    Progress,
    check_resume,
    cut_unfinished_line,
    find_resume_run,
    load_progress,
    open_run_dir,
    read_run_args,
)
from kapao.infer.sinks import ResultWriter, Sink
from kapao.runtime import atomic_write

LOGGER = logging.getLogger(__name__)

PARTS = "parts"  # the folder of a sharded run's per-rank JSONL parts (removed once merged)


@dataclass
class ShardPlan:
    """What rank 0 decided for every rank: the run folder, the session of parts, each rank's items
    (indices into SourceSpec.items) and what earlier sessions already did."""

    run_dir: Path
    session: int
    items: list[list[int]]
    done: Progress

    def part(self, rank: int) -> str:
        """A rank's JSONL part, relative to the run folder."""
        return f"{PARTS}/{self.session:03d}-{rank:04d}.jsonl"


def has_parts(run_dir: Path) -> bool:
    """True when `run_dir` is a sharded run whose parts are not merged yet."""
    return any((run_dir / PARTS).glob("*.jsonl"))


def work_units(spec: SourceSpec, batch: int, track: bool = False) -> list[list[int]]:
    """Item indices grouped into the units no rank splits (see the module docstring), in order."""
    videos = [[i] for i, item in enumerate(spec.items) if spec.is_video(item)]
    if track:  # every video alone; all images together (one tracked sequence)
        images = [i for i, item in enumerate(spec.items) if not spec.is_video(item)]
        return sorted(videos + ([images] if images else []))
    units: list[list[int]] = []
    run: list[int] = []  # consecutive images: batched from the first one after a video, as one process does
    for i, item in enumerate(spec.items):
        if spec.is_video(item):
            units += [run[j: j + batch] for j in range(0, len(run), batch)] + [[i]]
            run = []
        else:
            run.append(i)
    return units + [run[j: j + batch] for j in range(0, len(run), batch)]


def split_units(weights: Sequence[int], world: int) -> list[range]:
    """Contiguous runs of units, one per rank, each holding about total/world of the weight (frames to
    do); a rank may get none. Deterministic: the same weights and world give the same split."""
    total = sum(weights)
    cuts, acc, r = [0], 0, 1
    for i, w in enumerate(weights):
        acc += w
        while r < world and acc * world >= r * total and (i + 1) > cuts[-1]:
            cuts.append(i + 1)
            r += 1
    cuts += [len(weights)] * (world + 1 - len(cuts))
    return [range(cuts[k], cuts[k + 1]) for k in range(world)]


def _unit_weight(spec: SourceSpec, unit: list[int], root: Path | None, done: Progress) -> int:
    """Frames of a unit still to do (a video's frame count is read from its header)."""
    item = spec.items[unit[0]]
    if spec.is_video(item):
        total = count_frames(item) or 1
        return max(0, total - 1 - done.frames.get(source_name(item, root), -1))
    return sum(not done.done(source_name(spec.items[i], root), None) for i in unit)


def read_done(run_dir: Path) -> Progress:
    """What a run folder holds: its predictions.jsonl and every part (unfinished last lines cut off)."""
    done = Progress()
    files = [run_dir / PREDICTIONS_JSONL] + sorted((run_dir / PARTS).glob("*.jsonl"))
    for path in files:
        try:
            p = load_progress(path)
        except OSError as e:
            raise DataError(f"cannot read {path}: {e.strerror or e}; fix its permissions (the run's other parts "
                            "are kept) and --resume again") from None
        done.images |= p.images
        for k, v in p.frames.items():
            done.frames[k] = max(v, done.frames.get(k, -1))
        done.lines += p.lines
    return done


def plan_run(spec: SourceSpec, args: dict[str, Any], world: int, *, project: str | Path, name: str,
             resume: str | Path | bool | None, batch: int, track: bool) -> ShardPlan:
    """Rank 0's plan: a new run folder (args.yaml written) or the resumed one, and each rank's items."""
    if spec.kind == "stream":
        raise UsageError(f"{spec.source} is a stream: one stream cannot be shared by processes; run one process")
    units = work_units(spec, batch, track)
    resume_dir = None
    if resume:
        resume_dir = find_resume_run(resume, project, name, spec.source)
        check_resume(resume_dir, spec, read_run_args(resume_dir), args)
    elif len(units) < world:
        raise UsageError(f"{world} processes for {len(units)} work units of {spec.source} (videos, batches of "
                         f"images): start at most {len(units)} processes (torchrun --nproc-per-node / --device)")
    done = read_done(resume_dir) if resume_dir is not None else Progress()
    root = source_root(spec)
    weights = [_unit_weight(spec, u, root, done) for u in units]
    todo = [(u, w) for u, w in zip(units, weights) if w]
    ranges = split_units([w for _, w in todo], world)
    if resume_dir is not None:
        args["run"] = read_run_args(resume_dir).get("run")  # the parts of a resumed run keep its run id
    run_dir, _, lock = open_run_dir(project, name, {}, args, resume_dir, True)
    lock.release()  # planning is rank 0's alone; the ranks then write only their own parts
    assert run_dir is not None  # wanted=True: a folder is always made or resumed
    session = 1 + max((int(p.name[:3]) for p in (run_dir / PARTS).glob("*.jsonl") if p.name[:3].isdigit()), default=-1)
    (run_dir / PARTS).mkdir(exist_ok=True)
    (run_dir / PREDICTIONS_JSONL).touch()  # what marks a predict run that --resume can find, before any merge
    items = [[i for u, _ in todo[r.start: r.stop] for i in u] for r in ranges]
    return ShardPlan(run_dir, session, items, done)


def _stop_check(env: DistEnv) -> FrameTransform:
    """A per-frame step that stops this rank as soon as another one has failed."""

    def step(frame: Frame, poses: Any) -> Any:
        check_stop(env)
        return poses

    return step


def run_part(api: KAPAO, spec: SourceSpec, plan: ShardPlan, env: DistEnv, opts: PredictOptions, save: bool,
             draw: DrawOptions, transforms: Sequence[FrameTransform], progress: bool) -> PredictRun:
    """This rank's share: its items through the predictor into its JSONL part and the run folder's media."""
    sub = dataclasses.replace(spec, items=[spec.items[i] for i in plan.items[env.rank]])
    root = source_root(spec)  # names relative to the whole SOURCE, as one process names them
    predictor = api.predictor(opts.settings, opts.scales, opts.flips, return_kp_objects=draw.show_kp_objects)
    run = PredictRun(plan.run_dir, timing=predictor.timing)
    readers: dict[str, VideoReader] = {}
    done = plan.done
    skip = (lambda item, frame: done.done(source_name(item, root), frame)) if done.lines else None
    t0 = time.perf_counter()
    writer = ResultWriter(plan.run_dir, api.schema, draw, save_media=save, root=root, jsonl=plan.part(env.rank),
                          run=read_run_args(plan.run_dir).get("run"))  # every record names its run, as one process's
    bar = tqdm(total=None, unit="frame", disable=not (progress and env.main), dynamic_ncols=True,
               desc=f"rank 0 of {env.world_size}" if env.distributed else None)
    try:
        frames = iter_frames(sub, readers, run.unreadable, skip)
        for chunk in predict_frames(predictor, frames, opts.imgsz, opts.batch, [*transforms, _stop_check(env)]):
            for frame, poses in chunk:
                writer.add(frame, poses)
                run.poses += len(poses)
            run.frames += len(chunk)
            bar.update(len(chunk))
    finally:
        bar.close()
        for r in readers.values():
            r.close()
        writer.close()
    run.seconds = time.perf_counter() - t0
    return run


def _keyed_lines(path: Path, order: dict[str, int]) -> Iterator[tuple[tuple[int, int], bytes]]:
    """(item index, frame or -1) and the raw line of every finished line of a JSONL file."""
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                return
            rec = json.loads(line)
            if rec.get("source") not in order:
                raise DataError(f"{path}: {rec.get('source')!r} is not part of the run's SOURCE; restore the file "
                                "or start a new run")
            yield (order[rec["source"]], -1 if rec.get("frame") is None else int(rec["frame"])), line


def merge_parts(run_dir: Path, spec: SourceSpec, num_keypoints: int, sinks: Sequence[Sink] = ()) -> Path:
    """predictions.jsonl of every part (and the predictions.jsonl there) in one process's order, then
    predictions.json and the files of `sinks` (replayed from the merged JSONL); the parts are removed
    last. Returns the predictions.json path."""
    root = source_root(spec)
    order = {source_name(item, root): i for i, item in enumerate(spec.items)}
    out = run_dir / PREDICTIONS_JSONL
    files = ([out] if out.exists() else []) + sorted((run_dir / PARTS).glob("*.jsonl"))
    for f in files:
        cut_unfinished_line(f)
    try:
        with atomic_write(out, "wb") as w:
            last = None
            for key, line in heapq.merge(*(_keyed_lines(f, order) for f in files), key=lambda kl: kl[0]):
                if key != last:  # a frame in two files (a merge interrupted before the parts were removed)
                    w.write(line)
                last = key
    except OSError as e:
        raise DataError(f"cannot write {out}: {e.strerror or e}; free disk space and --resume (the parts are kept)") from None
    json_path = write_coco_json(out, run_dir / PREDICTIONS_JSON, num_keypoints)
    if sinks:
        _replay(out, run_dir, num_keypoints, sinks)
    shutil.rmtree(run_dir / PARTS, ignore_errors=True)
    return json_path


def _replay(jsonl: Path, run_dir: Path, num_keypoints: int, sinks: Sequence[Sink]) -> None:
    """Feed the merged JSONL's frames (poses as written, no image) to `sinks` in a scratch folder, then
    move their files into the run folder (each replaces the one there)."""
    scratch = run_dir / PARTS / "replay"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    for s in sinks:
        s.open(scratch)
    try:
        for rec in read_records(jsonl):
            frame = Frame(None, rec["source"], rec.get("frame"))  # type: ignore[arg-type]  # sinks that replay read no image
            poses = poses_from_records(rec["poses"], num_keypoints)
            for s in sinks:
                s.add(frame, poses)
    finally:
        for s in sinks:
            s.close()
    for f in sorted(scratch.iterdir()):
        os.replace(f, run_dir / f.name)


@dataclass
class ShardedRun:
    """What a sharded run produced, summed over ranks (rank 0's view)."""

    save_dir: Path
    frames: int
    poses: int
    unreadable: list[str]
    seconds: float
    resumed: int
    json_path: Path | None


def run_sharded(api: KAPAO, spec: SourceSpec, env: DistEnv, options: PredictOptions, output: OutputOptions,
                transforms: Sequence[FrameTransform] = (), sinks: Sequence[Sink] = (),
                track: bool = False) -> ShardedRun | None:
    """The predict verb on every rank of a torchrun job (or one process continuing a sharded run):
    plan (rank 0), run this rank's part, merge (rank 0). Returns the summary on rank 0, None elsewhere;
    raises on every rank when any rank failed (the failing rank's error on rank 0). `output.show` and
    `output.keep_results` are not used (one window, and the poses stay in the files)."""
    opts, out = options, output
    api.check_imgsz(opts.imgsz)
    if opts.batch < 1:
        raise ConfigError(f"--batch {opts.batch}: must be at least 1")
    plan, error = None, None
    if env.main:
        try:
            plan = plan_run(spec, api.run_args(spec, opts), env.world_size, project=out.project, name=out.name,
                            resume=out.resume, batch=opts.batch, track=track)
        except Exception as e:  # noqa: BLE001 - every rank learns of it in agree()
            error = e
    agree(error, env)
    plan = broadcast(plan, env)
    run, error = None, None
    try:
        run = run_part(api, spec, plan, env, opts, out.save, out.draw or DrawOptions(), transforms, out.progress)
    except Exception as e:  # noqa: BLE001 - the other ranks stop at their next frame, then every rank raises
        if not isinstance(e, RankStopped):
            signal_error(env)
        error = e
    agree(error, env)
    assert run is not None  # agree() raised otherwise
    counts = gather((run.frames, run.poses, run.unreadable, run.seconds), env)
    return _finish(plan, spec, api, env, counts, sinks)


def _finish(plan: ShardPlan, spec: SourceSpec, api: KAPAO, env: DistEnv, counts: list[Any] | None,
            sinks: Sequence[Sink]) -> ShardedRun | None:
    """Rank 0 merges the parts (every rank waits for it, and raises with it when it fails)."""
    result, error = None, None
    if env.main:
        assert counts is not None  # rank 0 gathers every rank's counts
        try:
            frames = sum(c[0] for c in counts)
            unreadable = [u for c in counts for u in c[2]]
            if frames == 0 and plan.done.lines == 0:
                why = f"{len(unreadable)} unreadable files" if unreadable else "the video has no frames"
                shutil.rmtree(plan.run_dir, ignore_errors=True)
                raise DataError(f"no frame could be read from {spec.source} ({why}); check the files")
            json_path = merge_parts(plan.run_dir, spec, api.schema.num_keypoints, sinks)
            result = ShardedRun(plan.run_dir, frames, sum(c[1] for c in counts), unreadable,
                                max(c[3] for c in counts), plan.done.lines, json_path)
        except Exception as e:  # noqa: BLE001 - shared with the other ranks in agree()
            error = e
    agree(error, env)
    return result
