"""The CLI side of many processes: launching one process per GPU for ``--device 0,1,…`` and running a
verb's body as one rank of a torchrun job (see :mod:`kapao.distributed`)."""
from __future__ import annotations

import sys
from typing import Callable, TypeVar

from kapao.distributed import DistEnv, RankStopped, close, launch, should_launch, start, verb_argv

T = TypeVar("T")


def launch_if_listed(verb: str, device: str | None) -> None:
    """With a GPU list (``--device 0,1,2,3``) outside torchrun: run `verb` on one process per GPU and exit
    with the launcher's code; otherwise return at once."""
    if device is not None and should_launch(device):
        sys.exit(launch(verb, verb_argv(verb), device))


def as_rank(env: DistEnv, device: str | None, body: Callable[[str | None], T]) -> T:
    """`body(device)` as this rank: join the job, take the rank's device (its GPU or the CPU), leave the
    job after. A rank stopped because another one failed exits 1 quietly (rank 0 prints that rank's error)."""
    try:
        dev = start(device, env)
        return body(str(dev) if env.distributed else device)
    except RankStopped:
        sys.exit(1)
    finally:
        close(env)
