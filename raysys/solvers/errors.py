"""Errors of the solvers subsystem, each naming the bad value and the fix."""

from raysys.runtime.errors import ConfigError, RaysysError


class InvalidInstance(RaysysError, ValueError):
    """One PDE instance cannot be solved (wrong shape, NaN, non-positive field)."""


class DataFormatError(ConfigError):
    """A data file is missing, unreadable, or lacks the arrays it must hold."""


class ModelFormatError(ConfigError):
    """A saved operator directory is missing files or holds inconsistent weights."""


class TrainingDiverged(RaysysError):
    """Training produced a non-finite loss; the weights are not worth saving."""
