"""Sharded predict/track (kapao.infer.shard): units, the split, merging parts, and real torchrun runs on CPU
(gloo, 2 processes) that must write exactly what one process writes."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cv2
import pytest
import yaml
from click.testing import CliRunner

from kapao.cli.main import cli
from kapao.data.sources import SourceSpec
from kapao.distributed import DistEnv
from kapao.errors import DataError
from kapao.infer.options import OutputOptions, PredictOptions
from kapao.infer.predictor import KAPAO
from kapao.infer.records import PREDICTIONS_JSON, PREDICTIONS_JSONL
from kapao.infer.shard import PARTS, has_parts, merge_parts, plan_run, run_sharded, split_units, work_units
from tests.infer.test_predictor import eager_weights  # noqa: F401 - a fixture

REPO = Path(__file__).resolve().parents[2]
OUTPUTS = (PREDICTIONS_JSONL, PREDICTIONS_JSON, "keypoints.csv")


def _spec(tmp_path: Path, names: list[str]) -> SourceSpec:
    return SourceSpec("mixed", [str(tmp_path / n) for n in names], 0, str(tmp_path))


def test_work_units_keep_batches_and_videos_whole(tmp_path: Path):
    spec = _spec(tmp_path, ["a.jpg", "b.jpg", "c.jpg", "v.mp4", "d.jpg", "e.jpg", "w.mp4"])
    assert work_units(spec, batch=1) == [[0], [1], [2], [3], [4], [5], [6]]
    assert work_units(spec, batch=2) == [[0, 1], [2], [3], [4, 5], [6]]  # batches restart after a video, as one process
    assert work_units(spec, batch=2, track=True) == [[0, 1, 2, 4, 5], [3], [6]]  # images: one tracked sequence


def test_split_units_is_contiguous_balanced_and_deterministic():
    assert split_units([1] * 5, 2) == [range(0, 3), range(3, 5)]
    assert split_units([10, 1, 1, 1], 2) == [range(0, 1), range(1, 4)]  # a long video alone
    assert split_units([1, 1], 3) == [range(0, 1), range(1, 2), range(2, 2)]  # a rank may get nothing
    w = [3, 1, 4, 1, 5, 9, 2, 6]
    parts = split_units(w, 3)
    assert parts == split_units(w, 3) and [i for r in parts for i in r] == list(range(len(w)))


def _record(name: str, frame: int | None = None) -> bytes:
    rec = {"source": name, "frame": frame, "time": None, "image_id": name, "poses": []}
    return json.dumps(rec, separators=(",", ":")).encode() + b"\n"


def test_merge_parts_gives_one_process_order_and_drops_repeats(tmp_path: Path):
    spec = _spec(tmp_path, ["a.jpg", "b.jpg", "v.mp4", "c.jpg"])
    run = tmp_path / "run"
    (run / PARTS).mkdir(parents=True)
    (run / PREDICTIONS_JSONL).write_bytes(_record("a.jpg"))  # a run resumed: what was merged before
    (run / PARTS / "000-0000.jsonl").write_bytes(_record("b.jpg") + _record("v.mp4", 0) + _record("v.mp4", 1))
    (run / PARTS / "000-0001.jsonl").write_bytes(_record("c.jpg") + b'{"unfinished')  # killed mid-line
    (run / PARTS / "001-0000.jsonl").write_bytes(_record("v.mp4", 1) + _record("v.mp4", 2))  # resumed: 1 again
    merge_parts(run, spec, 17)
    expected = [_record("a.jpg"), _record("b.jpg"), _record("v.mp4", 0), _record("v.mp4", 1), _record("v.mp4", 2),
                _record("c.jpg")]
    assert (run / PREDICTIONS_JSONL).read_bytes() == b"".join(expected)
    assert json.loads((run / PREDICTIONS_JSON).read_text()) == [] and not (run / PARTS).exists()


def test_merge_parts_refuses_a_record_of_another_source(tmp_path: Path):
    spec = _spec(tmp_path, ["a.jpg"])
    (tmp_path / "run" / PARTS).mkdir(parents=True)
    (tmp_path / "run" / PARTS / "000-0000.jsonl").write_bytes(_record("zzz.jpg"))
    with pytest.raises(DataError, match="zzz.jpg"):
        merge_parts(tmp_path / "run", spec, 17)
    assert has_parts(tmp_path / "run") and not (tmp_path / "run" / PREDICTIONS_JSONL).exists()  # nothing merged


def test_plan_refuses_more_processes_than_units_and_unreadable_parts(tmp_path: Path, coco_mini: Path):
    spec = SourceSpec("images", sorted(str(p) for p in (coco_mini / "images").iterdir()), 0, str(coco_mini / "images"))
    args = {"source": spec.source}
    with pytest.raises(Exception, match="5 processes for 4 work units .* start at most 4 processes"):
        plan_run(spec, args, 5, project=tmp_path / "runs", name="exp", resume=None, batch=1, track=False)
    assert not (tmp_path / "runs").exists()
    plan = plan_run(spec, args, 2, project=tmp_path / "runs", name="exp", resume=None, batch=1, track=False)
    assert plan.items == [[0, 1], [2, 3]] and plan.session == 0 and plan.part(1) == "parts/000-0001.jsonl"
    (plan.run_dir / PREDICTIONS_JSONL).write_bytes(b"")
    (plan.run_dir / PARTS / "000-0001.jsonl").mkdir()  # a part that cannot be read as a file
    with pytest.raises(DataError, match="cannot read .*000-0001.jsonl"):
        plan_run(spec, args, 2, project=tmp_path / "runs", name="exp", resume=plan.run_dir, batch=1, track=False)


@pytest.mark.slow
def test_one_process_through_the_sharded_path_writes_what_run_writes(eager_weights: Path, coco_mini: Path,  # noqa: F811
                                                                      tmp_path: Path):
    api = KAPAO(eager_weights, device="cpu", backend="torch")
    src = str(coco_mini / "images")
    single = api.run(src, imgsz=64, project=tmp_path / "one", save=False)
    spec = SourceSpec("images", sorted(str(p) for p in (coco_mini / "images").iterdir()), 0, src)
    res = run_sharded(api, spec, DistEnv(), PredictOptions(imgsz=64), OutputOptions(save=False, project=tmp_path / "two"))
    assert res.frames == 4 and not has_parts(res.save_dir)
    for name in (PREDICTIONS_JSONL, PREDICTIONS_JSON):
        assert _run_bytes(res.save_dir, name) == _run_bytes(single.save_dir, name)


def test_missing_gpu_index_is_a_usage_error(eager_weights: Path, coco_mini: Path):  # noqa: F811
    if __import__("torch").cuda.device_count() >= 8:
        pytest.skip("this machine has GPU 7")
    res = CliRunner().invoke(cli, ["predict", str(coco_mini / "images"), "--weights", str(eager_weights), "--device", "0,7"])
    assert res.exit_code == 2 and "--device" in res.output and "Traceback" not in res.output


# ----------------------------------------------------------------------------------------------
# torchrun on the CPU (gloo): 2 processes against one

@pytest.fixture(scope="module")
def folder(tmp_path_factory, coco_mini: Path, test_video: Path) -> Path:
    """42 images (coco-mini, resized and mirrored, some in a sub-folder with a video) and a video."""
    out = tmp_path_factory.mktemp("src")
    images = sorted((coco_mini / "images").iterdir())
    for i in range(42):
        im = cv2.imread(str(images[i % len(images)]))
        im = cv2.resize(cv2.flip(im, 1) if (i // 4) % 2 else im, None, fx=0.3 + 0.02 * (i // 8), fy=0.3 + 0.02 * (i // 8))
        cv2.imwrite(str(out / f"img{i:03d}.jpg"), im)
    shutil.copy(test_video, out / "clip.mp4")
    return out


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _kapao(*args: str, nproc: int = 0, rdzv: tuple[str, ...] = ("--standalone",), timeout: int = 600,
           wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    """`kapao ARGS` in one process (nproc 0) or under torchrun with `nproc` processes."""
    run = ["-m", "torch.distributed.run", *rdzv, "--nproc-per-node", str(nproc)] if nproc else []
    cmd = [sys.executable, *run, "-m", "kapao", *args]
    if not wait:
        return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


RUN_ID = re.compile(rb'"run":"([0-9a-f]{12})"')


def _run_bytes(folder: Path, name: str) -> bytes:
    """A run file's bytes with its run id (different in every run, one per run) blanked; the id itself must be
    the one in the run's args.yaml on every line."""
    data = (folder / name).read_bytes()
    ids = set(RUN_ID.findall(data))
    if name == PREDICTIONS_JSONL and data:
        assert ids == {yaml.safe_load((folder / "args.yaml").read_text())["run"].encode()}, (folder, ids)
    return RUN_ID.sub(b'"run":"-"', data)


def _same_outputs(a: Path, b: Path, names=OUTPUTS) -> None:
    for name in names:
        assert _run_bytes(a, name) == _run_bytes(b, name), name
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())  # drawn media too


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_write_what_one_writes_byte_for_byte(folder: Path, eager_weights: Path, tmp_path: Path):  # noqa: F811
    common = [str(folder), "--weights", str(eager_weights), "--imgsz", "64", "--device", "cpu", "--save-csv"]
    one = _kapao("predict", *common, "--project", str(tmp_path / "one"))
    two = _kapao("predict", *common, "--project", str(tmp_path / "two"), nproc=2)
    assert one.returncode == 0 and two.returncode == 0, two.stdout + two.stderr
    assert "47 frames" in two.stdout and "on 2 processes" in two.stdout and two.stdout.count("Results saved") == 1
    _same_outputs(tmp_path / "one" / "exp", tmp_path / "two" / "exp")
    assert not (tmp_path / "two" / "exp" / PARTS).exists()


@pytest.mark.slow
def test_track_keeps_each_video_on_one_rank(test_video: Path, eager_weights: Path, tmp_path: Path):  # noqa: F811
    src = tmp_path / "videos"
    src.mkdir()
    for name in ("a.mp4", "b.mp4"):
        shutil.copy(test_video, src / name)
    common = ["track", str(src), "--weights", str(eager_weights), "--imgsz", "64", "--device", "cpu", "--nosave"]
    one = _kapao(*common, "--project", str(tmp_path / "one"))
    two = _kapao(*common, "--project", str(tmp_path / "two"), nproc=2)
    assert one.returncode == 0 and two.returncode == 0, two.stdout + two.stderr
    _same_outputs(tmp_path / "one" / "exp", tmp_path / "two" / "exp", OUTPUTS[:2])
    assert '"track_id":1' in (tmp_path / "two" / "exp" / PREDICTIONS_JSONL).read_text()


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    import psutil

    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "kapao" in " ".join(child.cmdline()):
                return child.pid
        except psutil.Error:
            continue
    return None


@pytest.mark.slow
def test_sigkill_of_one_rank_then_resume_gives_every_image_once(folder: Path, eager_weights: Path, tmp_path: Path):  # noqa: F811
    common = [str(folder), "--weights", str(eager_weights), "--imgsz", "64", "--device", "cpu", "--nosave"]
    one = _kapao("predict", *common, "--project", str(tmp_path / "one"))
    assert one.returncode == 0, one.stdout + one.stderr
    launcher = _kapao("predict", *common, "--project", str(tmp_path / "two"), nproc=2, wait=False)
    part = tmp_path / "two" / "exp" / PARTS / "000-0001.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (part.exists() and part.read_bytes().count(b"\n") >= 3):
        time.sleep(0.2)
    pid = _rank_pid(launcher, 1)
    assert pid is not None, "rank 1 not found"
    os.kill(pid, signal.SIGKILL)
    launcher.communicate(timeout=300)
    assert launcher.returncode != 0 and has_parts(tmp_path / "two" / "exp")
    assert not (tmp_path / "two" / "exp" / PREDICTIONS_JSON).exists()  # nothing merged half-way
    # resumed by ONE process: the rest re-sharded over the processes there are now
    res = _kapao("predict", "--resume", str(tmp_path / "two" / "exp"), "--device", "cpu", "--nosave")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "already done" in res.stdout
    _same_outputs(tmp_path / "one" / "exp", tmp_path / "two" / "exp", OUTPUTS[:2])


@pytest.mark.slow
def test_disk_full_on_one_rank_is_one_line_on_rank_0_and_resume_finishes(folder: Path, eager_weights: Path,  # noqa: F811
                                                                          tmp_path: Path):
    script = tmp_path / "full_rank1.py"  # rank 1's disk "fills up" after 3 frames
    script.write_text(textwrap.dedent("""
        import errno, os
        import kapao.infer.sinks as s
        from kapao.cli.main import main

        class Full:  # a file whose disk is full
            def __init__(self, f):
                self.f = f
            def write(self, data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            def __getattr__(self, name):
                return getattr(self.f, name)

        add = s.JsonlSink.add
        def full(self, frame, poses):
            self.n = getattr(self, "n", 0) + 1
            if os.environ["RANK"] == "1" and self.n == 4:
                self._file = Full(self._file)
            add(self, frame, poses)
        s.JsonlSink.add = full
        main()
        """))
    common = [str(folder), "--weights", str(eager_weights), "--imgsz", "64", "--device", "cpu", "--nosave",
              "--project", str(tmp_path / "runs")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           "predict", *common]
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    run = tmp_path / "runs" / "exp"
    errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error:")]
    assert out.returncode != 0 and errors == [f"Error: rank 1: cannot write {run / PARTS / '000-0001.jsonl'}: "
                                              "No space left on device; free disk space"], out.stdout + out.stderr
    assert has_parts(run) and (run / PREDICTIONS_JSONL).read_bytes() == b""  # the parts stay, nothing merged
    assert not (run / PREDICTIONS_JSON).exists()
    res = _kapao("predict", "--resume", str(run), "--device", "cpu", "--nosave", nproc=2)
    assert res.returncode == 0, res.stdout + res.stderr
    one = _kapao("predict", *common[:-2], "--project", str(tmp_path / "one"))
    assert one.returncode == 0
    _same_outputs(tmp_path / "one" / "exp", run, OUTPUTS[:2])


@pytest.mark.slow
def test_more_processes_than_files_is_one_line_on_rank_0(coco_mini: Path, eager_weights: Path, tmp_path: Path):  # noqa: F811
    out = _kapao("predict", str(coco_mini / "images"), "--weights", str(eager_weights), "--imgsz", "64", "--device",
                 "cpu", "--project", str(tmp_path / "runs"), nproc=5, timeout=900)
    errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error:")]
    assert out.returncode != 0 and len(errors) == 1 and "5 processes for 4 work units" in errors[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_two_nodes_on_localhost(folder: Path, eager_weights: Path, tmp_path: Path):  # noqa: F811
    common = [str(folder), "--weights", str(eager_weights), "--imgsz", "64", "--device", "cpu", "--nosave"]
    port = _free_port()
    nodes = [_kapao("predict", *common, "--project", str(tmp_path / "two"), nproc=1, wait=False,
                    rdzv=("--nnodes", "2", "--node-rank", str(i), "--master-addr", "127.0.0.1",
                          "--master-port", str(port))) for i in (0, 1)]
    logs = [n.communicate(timeout=600)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], logs
    assert "on 2 processes" in logs[0] and "Results saved" not in logs[1]
    one = _kapao("predict", *common, "--project", str(tmp_path / "one"))
    assert one.returncode == 0
    _same_outputs(tmp_path / "one" / "exp", tmp_path / "two" / "exp", OUTPUTS[:2])
