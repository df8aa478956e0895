"""What the scripts share: the test data folder, timing, the machine's matmul figure, the memorisation recipe,
a coco-mini style dataset YAML, and the reference NMS of the tests.

`python scripts/<name>.py` puts scripts/ on sys.path, so a script imports this as `import _common`; kapao
itself comes from the installed package.
"""
from __future__ import annotations

import importlib.util
import os
import statistics
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable

import torch

REPO = Path(__file__).resolve().parents[1]
MATMUL_N = 2048  # the machine figure: an N x N x N fp32 matmul

# tests/train/test_trainer.py::test_training_learns' recipe: augmentation off, lr0 0.05, an optimiser step per batch
NO_AUGMENTATION = {"mosaic": 0, "fliplr": 0, "scale": 0, "translate": 0, "hsv_h": 0, "hsv_s": 0, "hsv_v": 0}
MEMORISE_HYP = {"lr0": 0.05, "nominal_batch": 4, "warmup_epochs": 0, "warmup_min_iters": 10, **NO_AUGMENTATION}


def test_data() -> Path:
    """The test data folder: $KAPAO_TEST_DATA, else ../shared/data next to the repository."""
    return Path(os.environ.get("KAPAO_TEST_DATA", REPO.parent / "shared" / "data"))


def median_ms(fn: Callable[[], Any], runs: int, warmup: int = 1, sync: bool = False) -> float:
    """Median wall time of `fn` in ms over `runs` calls after `warmup` untimed ones (first-call allocations,
    runtime shape specialisation); `sync` waits for CUDA around each timed call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def matmul_gflops(device: torch.device, runs: int, warmup: int = 1, dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of one MATMUL_N^3 matmul in `dtype` (default fp32) on `device` (2 N^3 FLOPs), median of `runs`:
    what the machine can do."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(MATMUL_N, MATMUL_N, device=device, generator=g).to(dtype)
    b = torch.randn(MATMUL_N, MATMUL_N, device=device, generator=g).to(dtype)
    ms = median_ms(lambda: torch.mm(a, b), runs, warmup, device.type == "cuda")
    return 2 * MATMUL_N**3 / (ms / 1000) / 1e9


def mini_yaml(folder: Path, out: Path, splits: Iterable[str] = ("train", "val", "test")) -> Path:
    """Write a dataset YAML (base coco) whose `splits` are all the coco-mini style `folder`
    (images/ + person_keypoints.json); returns `out`."""
    lines = "".join(f"{s}: images\n{s}_annotations: person_keypoints.json\n" for s in splits)
    out.write_text(f"base: coco\nname: {folder.name}\npath: {folder.resolve()}\n{lines}")
    return out


def memorise(data: Path, project: Path, imgsz: int, epochs: int, **train_args: Any) -> Path:
    """Train size n on the dataset YAML `data` with MEMORISE_HYP on the CPU (batch 4: all of coco-mini per step,
    no validation, no plots); returns the run's last.pt. `train_args` go to TrainArgs as they are."""
    from kapao.train.run import TrainArgs
    from kapao.train.trainer import train

    run = train(TrainArgs(data=str(data), size="n", imgsz=imgsz, epochs=epochs, batch=4, device="cpu", workers=0,
                          noval=True, plots=False, project=str(project), hyp_overrides=MEMORISE_HYP, **train_args))
    return Path(run) / "weights" / "last.pt"


def reference_nms() -> ModuleType:
    """tests/infer/reference_nms.py (the NMS before the early-stopping rewrite), loaded by file path:
    the tests are not a package the scripts import."""
    path = REPO / "tests" / "infer" / "reference_nms.py"
    spec = importlib.util.spec_from_file_location("reference_nms", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
