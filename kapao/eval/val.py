"""The `val` verb: inference over a dataset split with the shared Predictor, then COCO/CrowdPose metrics.

Training calls :func:`validate` every epoch with its EMA model and a prebuilt loader.

On many processes (torchrun, ``kapao val --device 0,1``, DDP training) every rank predicts a contiguous
share of the split's batches (the same batches, so the same letterbox shapes, as one process), the
COCO results are gathered on rank 0 in batch order, and rank 0 alone evaluates: the metrics are those
of one process. What stays serial: building the dataset (every rank reads the annotations), the
COCO/CrowdPose evaluation and writing predictions.json (rank 0).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence, cast

import torch
from tqdm import tqdm

from kapao.backends.int8 import Int8Calibration
from kapao.cfg.schema import DatasetConfig
from kapao.cfg.settings import VAL_SETTINGS, InferenceSettings
from kapao.data.dataset import PoseDataset, build_dataloader
from kapao.distributed import DistEnv, RankStopped, agree, check_stop, gather, signal_error
from kapao.eval.metrics import evaluate, format_metrics, save_results
from kapao.infer.engine import Predictor, Timing
from kapao.infer.predictor import KAPAO
from kapao.infer.shard import split_units
from kapao.poses import Poses
from kapao.runtime import increment_run_dir, remove_if_empty
from kapao.weights.checkpoint import check_compatible

LOGGER = logging.getLogger(__name__)


def protocol_for(dataset: PoseDataset) -> Literal["coco", "crowdpose"]:
    """CrowdPose protocol when every ground-truth image has a `crowdIndex`, else COCO."""
    images = dataset.coco.dataset.get("images", [])
    return "crowdpose" if images and all("crowdIndex" in im for im in images) else "coco"


@dataclass
class ValResult:
    """Metrics of one validation run plus what it wrote."""

    metrics: dict[str, float]
    protocol: str
    timing_ms: dict[str, float]
    images: int
    poses: int
    json_path: Path | None = None
    predictions: list[tuple[dict[str, Any], Poses]] = field(default_factory=list)  # (meta, poses), when kept
    pr: dict[str, Any] = field(default_factory=dict)  # OKS precision-recall curves (COCO protocol; metrics.evaluate_coco)

    def table(self) -> str:
        return format_metrics(self.metrics)


def make_val_loader(cfg: DatasetConfig, split: str, imgsz: int, batch: int, workers: int = 0,
                    env: DistEnv | None = None) -> torch.utils.data.DataLoader:
    """Letterboxed, rectangular batches of a split, in a fixed order; under torchrun this rank's
    contiguous share of those batches (a rank may get none when there are fewer batches than ranks)."""
    dataset = PoseDataset(cfg, split, imgsz, augment=False, rect=True, batch_size=batch)
    sampler = None
    if env is not None and env.distributed:
        share = split_units([1] * -(-len(dataset) // batch), env.world_size)[env.rank]
        sampler = range(share.start * batch, min(share.stop * batch, len(dataset)))
    return build_dataloader(dataset, batch, workers, shuffle=False, sampler=cast(Any, sampler))  # a range samples in order


def validate(predictor: Predictor, loader: torch.utils.data.DataLoader, *,
             protocol: Literal["coco", "crowdpose"] | None = None,
             save_dir: Path | None = None, progress: bool = True, keep: int = 0,
             batch_hook: Callable[[torch.Tensor], None] | None = None,
             env: DistEnv | None = None) -> ValResult | None:
    """Run `predictor` over every batch of `loader` and evaluate the poses against the split's GT.

    keep: how many (meta, Poses) pairs to keep for drawing (train draws a sample of them);
    batch_hook: called with each batch's targets (M, 6 + 3K) after its poses (training's validation loss).
    env: this rank of a torchrun job, `loader` its share (:func:`make_val_loader`): the results are gathered
    and evaluated on rank 0, which returns the ValResult; the other ranks return None.
    """
    env = env or DistEnv()
    dataset = cast(PoseDataset, loader.dataset)  # DataLoader types its dataset as any Dataset
    protocol = protocol or protocol_for(dataset)
    results: list[dict[str, Any]] = []
    kept: list[tuple[dict[str, Any], Poses]] = []
    error = None
    try:
        images = _predict_split(predictor, loader, results, kept, keep, progress and env.main, env, batch_hook)
    except Exception as e:  # noqa: BLE001 - the other ranks stop at their next batch, then every rank raises
        if not isinstance(e, RankStopped):
            signal_error(env)
        error = e
    agree(error, env)
    t = predictor.timing
    parts = gather((results, images, (t.pre, t.infer, t.post, t.images)), env)
    if not env.main:
        return None
    if env.distributed:
        assert parts is not None  # rank 0 gathers every rank's part
        results = [r for part in parts for r in part[0]]
        images = sum(part[1] for part in parts)
        t = Timing(*(sum(part[2][i] for part in parts) for i in range(4)))
    json_path = save_results(results, save_dir / "predictions.json") if save_dir else None  # kept if evaluation fails
    pr: dict[str, Any] = {}
    metrics = evaluate(dataset.coco, results, dataset.schema, protocol, pr=pr if protocol == "coco" else None)
    return ValResult(metrics, protocol, t.per_image_ms(), images, len(results), json_path, kept, pr)


def _predict_split(predictor: Predictor, loader: torch.utils.data.DataLoader, results: list[dict[str, Any]],
                   kept: list[tuple[dict[str, Any], Poses]], keep: int, progress: bool, env: DistEnv,
                   batch_hook: Callable[[torch.Tensor], None] | None = None) -> int:
    """COCO results of every batch of `loader` appended to `results` (and up to `keep` drawn samples to
    `kept`); the number of images. Stops when another rank has failed."""
    dataset = cast(PoseDataset, loader.dataset)
    bar = tqdm(loader, desc=f"val {dataset.cfg.name}/{dataset.split}", unit="batch", disable=not progress,
               dynamic_ncols=True, leave=False)
    images = 0
    t0 = time.perf_counter()
    for imgs, targets, metas in bar:
        predictor.timing.pre += time.perf_counter() - t0  # loading + letterboxing, done by the loader
        check_stop(env)
        poses = predictor(imgs, metas)
        if batch_hook is not None:
            batch_hook(targets)
        for meta, p in zip(metas, poses):
            results.extend(p.to_coco(meta["image_id"]))
            if len(kept) < keep:
                kept.append((meta, p.to("cpu")))
        images += len(metas)
        t0 = time.perf_counter()
    return images


def run_val(weights: str | Path | torch.nn.Module, cfg: DatasetConfig, *, split: str = "val", imgsz: int = 1280,
            batch: int = 8, workers: int = 0, device: str | None = None, half: bool = False,
            settings: InferenceSettings = VAL_SETTINGS, scales: Sequence[float] | None = None,
            flips: Sequence[bool] | None = None, project: str | Path | None = None, name: str = "exp",
            progress: bool = True, backend: str = "auto", int8: Int8Calibration | None = None,
            env: DistEnv | None = None) -> ValResult | None:
    """The `kapao val` verb as a function: load weights, check them against the data, validate.

    With `project`, predictions.json goes to a new `project/nameN` folder, made once the weights and
    the data have loaded; a run that fails before writing anything leaves no empty folder. env: this
    rank of a torchrun job (`device` its own): rank 0 returns the result, the others None.
    """
    env = env or DistEnv()
    loader, api, error = None, None, None
    try:
        api = KAPAO(weights, device=device, half=half, backend=backend, int8=int8)
        what = "the model" if isinstance(weights, torch.nn.Module) else f"the weights ({weights})"
        check_compatible(api.schema, cfg.schema, what=what)
        loader = make_val_loader(cfg, split, api.check_imgsz(imgsz), batch, workers, env)
    except Exception as e:  # noqa: BLE001 - every rank learns of it in agree()
        error = e
    agree(error, env)
    assert api is not None and loader is not None  # agree() raised otherwise
    save_dir = increment_run_dir(project, name) if project is not None and env.main else None
    try:
        return validate(api.predictor(settings, scales, flips), loader, save_dir=save_dir, progress=progress, env=env)
    except BaseException:
        remove_if_empty(save_dir)  # failed (or interrupted) before predictions.json was written
        raise
