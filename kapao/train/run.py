"""A training run's arguments and folder: TrainArgs, where a run goes (a new runs/train/expN or the
folder of a run to resume), its args.yaml/hyp.yaml, and its checkpoints once it has finished.

Checkpoints (``weights/last.pt``, ``weights/best.pt``) hold the EMA weights as the model and, in
``extra``, what a resume needs; :func:`strip_checkpoint` drops the resume-only part when a run ends.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, overload

import yaml

from kapao.cfg.schema import DatasetConfig
from kapao.cfg.settings import Hyp, load_hyp
from kapao.distributed import DistEnv, broadcast
from kapao.errors import ConfigError, DataError, KapaoError, UsageError, WeightsError
from kapao.models.network import KapaoModel
from kapao.runtime import atomic_write, increment_run_dir
from kapao.weights.checkpoint import load_checkpoint, save_checkpoint
from kapao.weights.download import resolve_weights
from kapao.weights.registry import DETECTOR_FOR_SIZE, DETECTOR_RELEASE

DEFAULT_EPOCHS = {"coco": 500, "crowdpose": 300}  # official recipes; anything else: FALLBACK_EPOCHS
FALLBACK_EPOCHS = 300
DEFAULT_SIZE = "s"
RESUME_ONLY = ("optimizer", "scaler", "model")  # checkpoint extras only a resume needs


@dataclass
class TrainArgs:
    """Everything a training run needs; stored as args.yaml and in every checkpoint (plain data)."""

    data: str = "coco"  # dataset: built-in name (coco, crowdpose) or YAML path
    size: str | None = None  # model size n/s/m/l/x; default: the --weights' size, else DEFAULT_SIZE
    imgsz: int = 1280  # square train/val input size, a multiple of 64
    epochs: int | None = None  # default: 500 for coco, 300 for crowdpose and custom data
    batch: int | None = None  # total batch over all processes; None: default_batch()
    device: str = ""  # '', 'cpu', '0' (single process); several GPUs via kapao.distributed.launch/torchrun
    workers: int = 8  # data-loader workers per process (capped at CPU count / processes)
    weights: str | None = None  # initial weights: a file or name; None: the size's YOLOv5 detector; '': random
    hyp: str | None = None  # hyperparameter YAML or built-in name (default: the official recipe)
    hyp_overrides: dict[str, float] = field(default_factory=dict)  # applied on top of `hyp`
    project: str = "runs/train"
    name: str = "exp"
    exist_ok: bool = False  # reuse project/name instead of incrementing it
    resume: bool | str | None = None  # True/'' (latest run), a run folder or a last.pt
    noval: bool = False  # validate only after the final epoch
    nosave: bool = False  # write last.pt/best.pt only after the final epoch (and on Ctrl-C)
    patience: int = 100  # stop after this many epochs without fitness improvement (0: never)
    cache: bool = False  # keep the resized training images in RAM
    sync_bn: bool = False  # SyncBatchNorm in multi-GPU training
    amp: bool = True  # mixed precision on CUDA (always off on CPU)
    seed: int = 0
    single_cls: bool = False  # YOLO-pose data: merge all classes into the one pose class
    plots: bool = True  # train_batch*.jpg, val_pred.jpg, val_labels.jpg, results.png, pr_curve.png
    tensorboard: bool = True  # TensorBoard event files in the run folder
    loggers: list[str] = field(default_factory=list)  # more loggers: mlflow, wandb (kapao.train.callbacks)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainArgs":
        """From args.yaml/checkpoint data; unknown keys (from another kapao version) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def resuming(self) -> bool:
        return self.resume not in (None, False)


# The paper's batches (official README: 4 V100 GPUs with 32 GB each, imgsz 1280, no accumulation)
PAPER_BATCH = {"s": 128, "m": 72, "l": 48}
PAPER_GPUS, PAPER_GPU_GIB = 4, 31.0  # a 32 GB V100 reports ~31.7 GiB
FALLBACK_BATCH = 16  # accumulated to the nominal batch 64


def default_batch(size: str, imgsz: int, device: Any, world_size: int) -> tuple[int, str]:
    """(total batch, a line saying why) when --batch is not given.

    The paper's batch for s/m/l when the GPUs of the run hold as much as its 4 x 32 GB at 1280 px: each
    process's share (batch / processes) must fit in its GPU at the paper's images per GiB
    (``PAPER_GPU_GIB * PAPER_GPUS / processes`` GiB per GPU, e.g. one 141 GB GPU, 2 x 80 GB or 4 x 32 GB).
    Otherwise :data:`FALLBACK_BATCH`, accumulated to the nominal batch (the same weight-decay scaling).
    """
    import torch

    paper = PAPER_BATCH.get(size)
    how = (f"the paper trained kapao-{size} with --batch {paper} on {PAPER_GPUS} x 32 GB GPUs (--device 0,1,2,3)"
           if paper else f"the paper trained no kapao-{size}")
    if paper is None or device.type != "cuda" or paper % world_size:
        return FALLBACK_BATCH, f"batch {FALLBACK_BATCH} (accumulated to 64); {how}"
    need = PAPER_GPU_GIB * PAPER_GPUS / world_size * (imgsz / 1280) ** 2
    have = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
    if have < need:
        return FALLBACK_BATCH, (f"batch {FALLBACK_BATCH} (accumulated to 64): {how}, which needs {need:.0f} GiB per GPU "
                                f"with {world_size} process(es), this GPU has {have:.0f}")
    return paper, f"batch {paper}, the paper's for kapao-{size} ({have:.0f} GiB per GPU, {world_size} process(es))"


def default_epochs(cfg: DatasetConfig) -> int:
    return DEFAULT_EPOCHS.get(cfg.name, FALLBACK_EPOCHS)


@overload
def absolute_if_file(spec: str) -> str: ...
@overload
def absolute_if_file(spec: None) -> None: ...
def absolute_if_file(spec: str | None) -> str | None:
    """An existing file's absolute path; names (coco, default, kapao_s_coco) and None unchanged."""
    return str(Path(spec).expanduser().resolve()) if spec and Path(spec).expanduser().is_file() else spec


def build_hyp(args: TrainArgs) -> Hyp:
    """The run's hyperparameters: args.hyp (file or built-in name) with args.hyp_overrides applied."""
    hyp = load_hyp(args.hyp)
    return Hyp.from_dict({**hyp.to_dict(), **dict(args.hyp_overrides)}, where="hyp overrides") \
        if args.hyp_overrides else hyp


def resolve_resume(spec: bool | str | os.PathLike | None, project: str | os.PathLike = "runs/train") -> tuple[Path, Path]:
    """(run folder, last.pt) of a resume spec: True/'' (latest last.pt under `project`), a run folder,
    its weights/ folder, or a checkpoint file."""
    last: Path | None
    if spec is None or spec is False:
        raise ValueError("resolve_resume needs a resume spec: True, a run folder or a checkpoint")
    if spec is True or (isinstance(spec, str) and spec.strip() in ("", "latest")):
        found = sorted(Path(project).glob("*/weights/last.pt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise ConfigError(f"--resume: no run to resume under {project} (no */weights/last.pt); "
                              "pass the run folder or its weights/last.pt")
        last = found[-1]
    else:
        p = Path(os.fspath(spec)).expanduser()
        last = p if p.is_file() else next((c for c in (p / "weights" / "last.pt", p / "last.pt") if c.is_file()), None)
        if last is None:
            raise ConfigError(f"--resume {spec}: no checkpoint there (expected a last.pt, or a run folder "
                              "holding weights/last.pt)")
    run_dir = last.parent.parent if last.parent.name == "weights" else last.parent
    return run_dir, last


def prepare_run(args: TrainArgs, env: DistEnv) -> tuple[Path, Path | None, TrainArgs]:
    """(run folder, checkpoint to resume or None, args with --weights resolved to a file), decided on
    rank 0 (which also downloads named weights once) and shared with the others."""
    decided: tuple[str, str | None, str | None] | None = None
    if env.main:
        if args.resuming:
            run_dir, last = resolve_resume(args.resume, args.project)
            decided = (str(run_dir), str(last), None)
        else:
            spec = start_weights(args)
            weights = str(_resolve_start(spec, args)) if spec else None
            decided = (str(increment_run_dir(args.project, args.name, args.exist_ok)), None, weights)
    run_dir, last, weights = broadcast(decided, env)
    return Path(run_dir), (Path(last) if last else None), dataclasses.replace(args, weights=weights or args.weights)


def start_weights(args: TrainArgs) -> str | None:
    """The initial weights of a new run: ``--weights`` as given (``''``: random initialisation), else the
    paper's start, the COCO-pretrained YOLOv5 v5.0 P6 detector of the size (yolov5s6 …; none for n)."""
    if args.weights is not None:
        return args.weights or None
    size = args.size or DEFAULT_SIZE
    name = DETECTOR_FOR_SIZE.get(size)
    log = logging.getLogger(__name__)
    if name is None:
        log.info("no YOLOv5 v5.0 P6 detector exists for size %s (yolov5%s6 came with v6.0: pass --weights "
                 "yolov5%s6.pt to start from it): training kapao-%s from random initialisation", size, size, size, size)
    else:
        log.info("starting from %s, the COCO-pretrained YOLOv5 %s detector (the paper's start; --scratch for random "
                 "initialisation)", name, DETECTOR_RELEASE)
    return name


def _resolve_start(spec: str, args: TrainArgs) -> Path:
    """The file of the run's initial weights; a default detector that cannot be fetched says how to go on."""
    try:
        return resolve_weights(spec)[0]
    except WeightsError as e:
        if args.weights is None:  # the default start, not asked for by name
            raise WeightsError(f"{e}; or train from random initialisation with --scratch") from None
        raise


RESUME_HYP = ("lr0", "lrf")  # hyperparameters a resumed run may change (--hyp-set); the rest is the run's own


def load_resume(last: Path, args: TrainArgs) -> tuple[dict[str, Any], TrainArgs]:
    """(checkpoint, the run's own args) to continue from `last`.

    This call's device and workers are kept; its epochs (when given) and --hyp-set values of
    :data:`RESUME_HYP` replace the run's own, so a diverged or finished run can continue with a lower
    lr0 or for more epochs. Raises UsageError (exit 2) for other --hyp-set keys or too few epochs, and
    KapaoError when the run has finished all its epochs and no more were asked for.
    """
    ckpt = load_checkpoint(last)
    resumed = TrainArgs.from_dict(ckpt["extra"].get("train_args") or {})
    done = int(ckpt["extra"]["epoch"]) + 1
    fixed = sorted(set(args.hyp_overrides) - set(RESUME_HYP))
    if fixed:
        raise UsageError(f"--hyp-set {', '.join(fixed)}: a resumed run keeps its own hyperparameters except "
                         f"{', '.join(RESUME_HYP)}; start a new run with --weights {last} to change the others")
    if args.epochs is not None and args.epochs <= done:
        raise UsageError(f"--epochs {args.epochs}: {last} has already completed {done} epochs; give more than {done}")
    epochs = args.epochs or resumed.epochs
    if epochs is not None and done >= epochs:
        raise KapaoError(f"{last} has finished all {epochs} epochs; nothing to resume (start a new run with "
                         "--weights to train further)")
    changed = ([f"epochs {resumed.epochs} -> {epochs}"] if epochs != resumed.epochs else []) + \
        [f"{k} {ckpt['extra'].get('hyp', {}).get(k)} -> {v:g}" for k, v in args.hyp_overrides.items()]
    if changed:
        logging.getLogger(__name__).info("resume with %s", ", ".join(changed))
    return ckpt, dataclasses.replace(resumed, resume=str(last), device=args.device, workers=args.workers, epochs=epochs,
                                     hyp_overrides={**resumed.hyp_overrides, **args.hyp_overrides})


def write_run_files(run_dir: Path, args: TrainArgs, hyp: Hyp) -> None:
    """weights/ and args.yaml, hyp.yaml (a resumed run rewrites them)."""
    try:
        (run_dir / "weights").mkdir(parents=True, exist_ok=True)
        for name, data in (("args.yaml", args.to_dict()), ("hyp.yaml", hyp.to_dict())):
            with atomic_write(run_dir / name, "w") as f:
                yaml.safe_dump(data, f, sort_keys=False)
    except OSError as e:
        raise DataError(f"cannot write into the run folder {run_dir}: {e.strerror or e}; free disk space "
                        "or use --project with a writable folder") from None


def strip_checkpoint(path: Path) -> None:
    """Drop the resume-only state from a finished run's checkpoint (a third of the size remains)."""
    if not path.exists():
        return
    ckpt = load_checkpoint(path)
    if any(k in ckpt["extra"] for k in RESUME_ONLY):
        model = KapaoModel.from_config(ckpt["config"])
        model.load_state_dict(ckpt["state_dict"])
        save_checkpoint(path, model, extra={k: v for k, v in ckpt["extra"].items() if k not in RESUME_ONLY})


def fitness(metrics: Mapping[str, float]) -> float:
    """Model selection score: 0.1 AP50 + 0.9 AP (OKS)."""
    return 0.1 * float(metrics.get("AP50", 0.0)) + 0.9 * float(metrics.get("AP", 0.0))


@dataclass
class RunState:
    """What a checkpoint carries besides weights and optimizer."""

    start_epoch: int = 0
    best_fitness: float = 0.0
    best_epoch: int = -1
    epochs_done: int = -1  # last epoch whose end-of-epoch work (validation, checkpoint) finished
