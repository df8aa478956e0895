"""A training run's args and folder (kapao.train.run): resume specs, default epochs, hyperparameter
overrides, run files, resuming a finished run and stripping a finished run's checkpoint."""
from __future__ import annotations

import logging
import os
from types import SimpleNamespace

import pytest
import torch
import yaml

from kapao.cfg.dataset import load_dataset_config
from kapao.cfg.settings import Hyp
from kapao.distributed import DistEnv
from kapao.errors import ConfigError, DataError, KapaoError, UsageError
from kapao.models.network import build_model
from kapao.train.run import (
    RESUME_ONLY,
    TrainArgs,
    absolute_if_file,
    build_hyp,
    default_batch,
    default_epochs,
    load_resume,
    prepare_run,
    resolve_resume,
    start_weights,
    strip_checkpoint,
    write_run_files,
)
from kapao.weights.checkpoint import load_checkpoint, save_checkpoint


def test_resolve_resume(tmp_path):
    with pytest.raises(ConfigError, match="no run to resume"):
        resolve_resume(True, tmp_path)
    old, new = tmp_path / "exp" / "weights" / "last.pt", tmp_path / "exp2" / "weights" / "last.pt"
    for p in (old, new):
        p.parent.mkdir(parents=True)
        p.write_bytes(b"x")
    os.utime(old, (1, 1))
    assert resolve_resume(True, tmp_path) == (tmp_path / "exp2", new)
    assert resolve_resume("", tmp_path) == (tmp_path / "exp2", new)
    assert resolve_resume(str(tmp_path / "exp")) == (tmp_path / "exp", old)
    assert resolve_resume(old) == (tmp_path / "exp", old)
    with pytest.raises(ConfigError, match="no checkpoint"):
        resolve_resume(tmp_path / "nope")


def test_default_epochs(coco_mini_yaml):
    assert default_epochs(load_dataset_config("coco")) == 500
    assert default_epochs(load_dataset_config("crowdpose")) == 300
    assert default_epochs(load_dataset_config(coco_mini_yaml)) == 300


def test_train_args_round_trip_ignores_unknown_keys():
    args = TrainArgs(data="crowdpose", epochs=3, hyp_overrides={"lr0": 0.02})
    assert TrainArgs.from_dict({**args.to_dict(), "from_a_newer_kapao": 1}) == args
    assert not TrainArgs().resuming and not TrainArgs(resume=False).resuming
    assert TrainArgs(resume="").resuming and TrainArgs(resume=True).resuming


def test_build_hyp_applies_overrides_and_absolute_paths(tmp_path):
    assert build_hyp(TrainArgs()) == Hyp()
    hyp = build_hyp(TrainArgs(hyp_overrides={"lr0": 0.02, "mosaic": 0}))
    assert hyp.lr0 == 0.02 and hyp.mosaic == 0 and hyp.momentum == Hyp().momentum
    f = tmp_path / "data.yaml"
    f.write_text("x")
    os.chdir(tmp_path)
    assert absolute_if_file("data.yaml") == str(f.resolve())
    assert absolute_if_file("coco") == "coco" and absolute_if_file(None) is None


def test_start_weights_default_to_the_paper_detector(caplog):
    caplog.set_level(logging.INFO, logger="kapao")
    assert [start_weights(TrainArgs(size=s)) for s in (None, "s", "m", "l", "x")] == \
        ["yolov5s6", "yolov5s6", "yolov5m6", "yolov5l6", "yolov5x6"]
    assert start_weights(TrainArgs(size="n")) is None
    assert "no YOLOv5 v5.0 P6 detector exists for size n" in caplog.text
    assert start_weights(TrainArgs(size="m", weights="")) is None  # --scratch
    assert start_weights(TrainArgs(size="m", weights="kapao_s_coco")) == "kapao_s_coco"


def test_default_batch_is_the_papers_where_the_gpus_hold_it(monkeypatch):
    cpu = torch.device("cpu")
    assert default_batch("s", 1280, cpu, 1)[0] == 16
    gib = {"v": 0}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=gib["v"] * 2 ** 30))
    cuda = torch.device("cuda", 0)
    for size, paper in {"s": 128, "m": 72, "l": 48}.items():
        gib["v"] = 32
        assert default_batch(size, 1280, cuda, 4)[0] == paper  # the paper's 4 x 32 GB
        assert default_batch(size, 1280, cuda, 1)[0] == 16  # one 32 GB GPU: accumulate instead
        gib["v"] = 141
        assert default_batch(size, 1280, cuda, 1)[0] == paper
    assert default_batch("n", 1280, cuda, 4)[0] == default_batch("x", 1280, cuda, 4)[0] == 16
    gib["v"] = 32
    assert "needs 124 GiB per GPU with 1 process(es), this GPU has 32" in default_batch("m", 1280, cuda, 1)[1]


def test_prepare_run_new_and_resumed(tmp_path):
    args = TrainArgs(project=str(tmp_path / "runs"), weights="")
    run, last, out = prepare_run(args, DistEnv())
    assert run == tmp_path / "runs" / "exp" and run.is_dir() and last is None and out == args
    (run / "weights").mkdir()
    (run / "weights" / "last.pt").write_bytes(b"x")
    assert prepare_run(TrainArgs(resume=str(run)), DistEnv())[:2] == (run, run / "weights" / "last.pt")


def test_write_run_files(tmp_path):
    args = TrainArgs(epochs=7)
    write_run_files(tmp_path / "exp", args, Hyp())
    assert (tmp_path / "exp" / "weights").is_dir()
    assert TrainArgs.from_dict(yaml.safe_load((tmp_path / "exp" / "args.yaml").read_text())) == args
    assert Hyp.from_dict(yaml.safe_load((tmp_path / "exp" / "hyp.yaml").read_text())) == Hyp()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DataError, match="cannot write into the run folder"):
        write_run_files(blocker / "exp", args, Hyp())


def _checkpoint(path, epoch: int, epochs: int):
    torch.manual_seed(0)
    model = build_model("n", 17)
    extra = {"epoch": epoch, "train_args": TrainArgs(epochs=epochs, device="0", workers=8).to_dict(),
             "optimizer": {"state": {}}, "scaler": {}, "model": model.state_dict(), "metrics": {"AP": 0.1}}
    save_checkpoint(path, model, extra=extra)
    return model


def test_load_resume_keeps_this_calls_device_and_refuses_a_finished_run(tmp_path):
    last = tmp_path / "last.pt"
    _checkpoint(last, epoch=1, epochs=3)
    ckpt, args = load_resume(last, TrainArgs(device="cpu", workers=0))
    assert ckpt["extra"]["epoch"] == 1
    assert (args.epochs, args.device, args.workers, args.resume) == (3, "cpu", 0, str(last))
    _checkpoint(last, epoch=2, epochs=3)
    with pytest.raises(KapaoError, match="has finished all 3 epochs; nothing to resume"):
        load_resume(last, TrainArgs())


def test_load_resume_applies_epochs_and_lr_and_refuses_other_overrides(tmp_path, caplog):
    last = tmp_path / "last.pt"
    _checkpoint(last, epoch=2, epochs=3)  # finished: more epochs continue it
    with caplog.at_level("INFO", logger="kapao"):
        _, args = load_resume(last, TrainArgs(epochs=6, hyp_overrides={"lr0": 0.001, "lrf": 0.2}))
    assert args.epochs == 6 and args.hyp_overrides == {"lr0": 0.001, "lrf": 0.2}
    assert "resume with epochs 3 -> 6, lr0 None -> 0.001, lrf None -> 0.2" in caplog.text  # (no hyp in this file)
    with pytest.raises(UsageError, match="--epochs 3: .* has already completed 3 epochs; give more than 3") as e:
        load_resume(last, TrainArgs(epochs=3))
    assert e.value.exit_code == 2
    with pytest.raises(UsageError, match="--hyp-set mosaic: a resumed run keeps its own hyperparameters except lr0, lrf"):
        load_resume(last, TrainArgs(epochs=6, hyp_overrides={"mosaic": 0.5}))


def test_strip_checkpoint_keeps_weights_and_metadata(tmp_path):
    path = tmp_path / "last.pt"
    strip_checkpoint(path)  # a missing best.pt is fine
    model = _checkpoint(path, epoch=2, epochs=3)
    strip_checkpoint(path)
    ckpt = load_checkpoint(path)
    assert not set(RESUME_ONLY) & set(ckpt["extra"]) and ckpt["extra"]["metrics"] == {"AP": 0.1}
    assert ckpt["extra"]["epoch"] == 2
    for k, v in model.state_dict().items():
        assert torch.equal(ckpt["state_dict"][k], v), k


def test_fitness():
    from kapao.train.run import fitness

    assert fitness({"AP": 0.5, "AP50": 0.8}) == pytest.approx(0.53)
