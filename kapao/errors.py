"""User-facing errors: the CLI prints them as one line (full traceback only with --verbose)."""
from __future__ import annotations


class KapaoError(Exception):
    """An error the user can fix; its message says what is wrong, where, and what to do."""

    exit_code = 1


class ConfigError(KapaoError, ValueError):
    """A dataset/hyperparameter/settings file or value is invalid."""


class DataError(KapaoError):
    """A dataset, image, video or annotation problem."""


class WeightsError(KapaoError):
    """A checkpoint is missing, corrupt, unsafe or incompatible."""
