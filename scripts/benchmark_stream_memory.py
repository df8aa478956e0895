"""Does `kapao predict` keep memory flat on a long stream? Peak RSS after N frames.

    python scripts/benchmark_stream_memory.py                          # 1 000 and 10 000 frames, imgsz 128
    python scripts/benchmark_stream_memory.py --frames 100 200 --imgsz 64   # a quick check that it works

Generates a video of moving blobs (max(--frames) + 10 frames, 160x120), then runs the real command line,
`python -m kapao predict VIDEO --weights W --imgsz N --project TMP`, in a child process (random-init
size-n weights unless --weights). The child streams one line per frame into predictions.jsonl; this
script counts those lines as they appear and reads the child's resident memory from /proc (Linux):
VmHWM (peak so far) and VmRSS when the count passes each --frames value. Once the last one is passed
the child is interrupted (Ctrl-C: it closes its sinks and writes predictions.json). Memory that does not
grow between the checkpoints means nothing accumulates per frame.
"""
from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np


def make_video(path: Path, frames: int, size: tuple[int, int] = (160, 120), fps: float = 30.0) -> Path:
    """A video of two blobs moving on a grey background, `frames` long."""
    w, h = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    if not writer.isOpened():
        raise SystemExit(f"cannot write {path}")
    for i in range(frames):
        img = np.full((h, w, 3), 114, np.uint8)
        for k, phase in enumerate((0.0, 2.0)):
            x = int(w / 2 + w / 3 * np.sin(i / 20 + phase))
            y = int(h / 2 + h / 4 * np.cos(i / 15 + phase))
            cv2.ellipse(img, (x, y), (8, 20), 0, 0, 360, (40 + 100 * k, 80, 200), -1)
        writer.write(img)
    writer.release()
    return path


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in KiB, from /proc/PID/status."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def count_lines(path: Path, state: dict[str, int]) -> int:
    """Lines of a growing file, reading only what was appended since the last call."""
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        f.seek(state.get("offset", 0))
        data = f.read()
    state["offset"] = state.get("offset", 0) + len(data)
    state["lines"] = state.get("lines", 0) + data.count(b"\n")
    return state["lines"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, nargs="+", default=[1000, 10000], help="checkpoints (frames done)")
    ap.add_argument("--imgsz", type=int, default=128)
    ap.add_argument("--weights", default=None, help="checkpoint (default: random-init size n)")
    ap.add_argument("--nosave", action="store_true", help="pass --nosave (no drawn video)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds")
    args = ap.parse_args()
    checkpoints = sorted(args.frames)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        video = make_video(tmp_path / "stream.mp4", checkpoints[-1] + 10)
        weights = args.weights
        if weights is None:
            import torch

            from kapao.models.network import build_model
            from kapao.weights.checkpoint import save_checkpoint

            torch.manual_seed(0)
            weights = str(save_checkpoint(tmp_path / "kapao_n.pt", build_model("n", 17)))
        project = tmp_path / "runs"
        cmd = [sys.executable, "-m", "kapao", "predict", str(video), "--weights", weights, "--imgsz", str(args.imgsz),
               "--device", "cpu", "--project", str(project), *(["--nosave"] if args.nosave else [])]
        log = (tmp_path / "child.log").open("w+b")  # a file, not a pipe: an undrained pipe would stall the child
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
        jsonl, state, rows = project / "exp" / "predictions.jsonl", {}, []
        t0 = time.monotonic()
        try:
            while checkpoints and child.poll() is None and time.monotonic() - t0 < args.timeout:
                done = count_lines(jsonl, state)
                if done >= checkpoints[0]:
                    mem = memory_kib(child.pid)
                    rows.append((checkpoints.pop(0), done, mem["VmHWM"], mem["VmRSS"], time.monotonic() - t0))
                time.sleep(0.05)
        finally:
            if child.poll() is None:
                child.send_signal(signal.SIGINT)
            try:
                child.wait(timeout=120)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            log.seek(0)
            err = log.read()
            log.close()
    if checkpoints:
        print(f"stopped early (exit {child.returncode}) before {checkpoints}: {err.decode()[-2000:]}")
    print(f"kapao predict on a {args.imgsz}-px stream, python {sys.version.split()[0]}, pid-level /proc memory\n")
    print("| frames done | peak RSS MiB (VmHWM) | RSS MiB (VmRSS) | seconds |")
    print("|---:|---:|---:|---:|")
    for want, done, hwm, rss, sec in rows:
        print(f"| {want} ({done}) | {hwm / 1024:.1f} | {rss / 1024:.1f} | {sec:.0f} |")
    if len(rows) >= 2:
        print(f"\npeak RSS growth from {rows[0][0]} to {rows[-1][0]} frames: {(rows[-1][2] - rows[0][2]) / 1024:+.1f} MiB")


if __name__ == "__main__":
    main()
