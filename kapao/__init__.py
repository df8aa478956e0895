"""kapao: single-stage multi-person pose estimation with Keypoints And Poses As Objects."""
from __future__ import annotations

from typing import Any

from kapao.version import __version__

__all__ = ["KAPAO", "Poses", "__version__"]


def __getattr__(name: str) -> Any:
    """Import the heavy API (torch, cv2) on first use, so `kapao --version` stays fast."""
    if name == "KAPAO":
        from kapao.infer.predictor import KAPAO

        return KAPAO
    if name == "Poses":
        from kapao.poses import Poses

        return Poses
    raise AttributeError(f"module 'kapao' has no attribute {name!r}")
