"""Exception hierarchy for runtime faults.

Configuration problems raise `ConfigError` before any work starts; faults met
while work runs raise subclasses of `RaysysError`, chained with
``raise ... from e`` so the original cause stays visible.
"""


class RaysysError(Exception):
    """Base class of every error raysys raises on purpose."""


class ConfigError(RaysysError, ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


class ClusterError(RaysysError):
    """The Ray cluster could not be started, reached or stopped."""


class RemoteTimeout(RaysysError, TimeoutError):
    """A bounded wait on a remote result ran out."""


class UnsatisfiableResources(RaysysError):
    """A request asks for resources the cluster can never provide."""


class PackageTooLarge(ConfigError):
    """A job's working_dir package exceeds what Ray's job API accepts."""


def last_line(error: BaseException | str) -> str:
    """The last non-empty line of an error's text: what a remote traceback ends with.

    Ray wraps a remote exception in its whole traceback; the last line names the
    exception and its message.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if lines:
        return lines[-1]
    return type(error).__name__ if isinstance(error, BaseException) else ""
