"""What `kapao info` says about weights: the named weights' table, and a checkpoint's description (the
model summary, the file and its format, what it was trained on, its metrics)."""
from __future__ import annotations

from typing import Any, Iterator

from kapao.models.network import format_model_info, model_info
from kapao.weights.loader import load_model
from kapao.weights.registry import DETECTORS, REGISTRY, PathLike, check_weights_spec


def named_weights_table() -> Iterator[str]:
    """One line per named weight: name, dataset, native input size, published AP."""
    for e in REGISTRY.values():
        ap = f"{e.ap:.1f} AP ({e.benchmark})" if e.ap is not None else "AP not published"
        yield f"{e.name:<18} {e.dataset:<9} imgsz {e.imgsz}  {ap}"


def describe_weights(spec: PathLike, imgsz: int) -> Iterator[str]:
    """The description of a weights spec, line by line as it is known: a named detector's entry (a start
    for training, not a pose model: nothing more); a named weight's registry entry (and nothing more until
    it is downloaded), then the loaded model's summary (layers, parameters, GFLOPs
    at `imgsz`) and :func:`checkpoint_lines`. Loading errors (corrupt, unsafe files) are raised."""
    path, name = check_weights_spec(spec)
    if name in DETECTORS:  # a start for training, not a pose model
        yield DETECTORS[name].describe()
        yield "downloaded" if path.is_file() else "not downloaded yet: `kapao train --weights NAME` downloads it"
        return
    if name is not None:
        yield REGISTRY[name].describe()
        if not path.is_file():
            yield "not downloaded yet: `kapao predict/val --weights NAME` downloads it"
            return
    model, meta = load_model(spec)
    yield format_model_info(model_info(model, imgsz))
    yield from checkpoint_lines(meta)


def checkpoint_lines(meta: dict[str, Any]) -> Iterator[str]:
    """A loaded checkpoint's file and format, the dataset (and epoch) it was trained on, its metrics and
    best fitness, for those it records (`meta`: the info of :func:`kapao.weights.loader.load_model`)."""
    yield f"weights: {meta['path']} ({meta['format']} checkpoint)"
    extra = meta.get("extra") or {}
    trained = extra.get("dataset") or extra.get("data")
    if trained:
        name = trained.get("name") if isinstance(trained, dict) else trained
        yield f"trained on: {name}" + (f", epoch {meta['epoch']}" if meta.get("epoch") not in (None, -1) else "")
    metrics = extra.get("metrics") or {}
    if metrics:
        yield "metrics: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float)))
    if meta.get("best_fitness") is not None:
        yield f"best fitness: {float(meta['best_fitness']):.4f}"
