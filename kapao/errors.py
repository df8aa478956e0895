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


class MissingPackageError(KapaoError, ImportError):
    """An optional package (or a dependency) is not installed; the message names the pip command."""


class UsageError(KapaoError):
    """The command line is wrong in a way only found after reading something it names (an output file
    that exists, an option a resumed run cannot change): exit code 2, as click's own usage errors."""

    exit_code = 2


class OutsideRootError(DataError):
    """A path read from a data file (a COCO `file_name`, a YOLO list line) that names no file inside the
    folder it must stay in, or that no file name can hold (a NUL byte)."""
