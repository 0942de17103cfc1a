"""Submit jobs through Ray's job API with the project as their working dir.

``raysys submit [--address URL] [--dry-run] -- python jobs/<job>.py ...`` is a
plain ``ray job submit`` underneath::

    ray job submit --address URL --working-dir <project> \\
        --runtime-env jobs/runtime_env.yaml -- python jobs/<job>.py ...

Before it runs that command it measures the package Ray would upload, with
Ray's own rules for what a working_dir ships (``.gitignore`` and
``.rayignore`` files, Ray's default excludes and the runtime_env's
``excludes``), and refuses a package Ray would refuse, naming the limit and the
biggest files, instead of failing after a long upload.

The limit comes from the installed Ray: the dashboard's HTTP server takes
request bodies of at most ``DASHBOARD_CLIENT_MAX_SIZE`` bytes (100 MiB), and the
GCS stores packages smaller than ``GCS_STORAGE_MAX_SIZE`` (the gRPC message
limit, 512 MiB unless ``RAY_max_grpc_message_size`` says otherwise); a job
submission passes both, so the smaller one binds.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from raysys.runtime.errors import ConfigError, PackageTooLarge
from raysys.runtime.ray_env import PROJECT_ROOT, RUNTIME_ENV_FILE, load_runtime_env

logger = logging.getLogger(__name__)

DEFAULT_DASHBOARD_URL = "http://127.0.0.1:8265"

# Bytes a stored (uncompressed) zip entry adds around its data: the local file
# header (30) and the central directory record (46), each followed by the name.
_ZIP_LOCAL_HEADER_BYTES = 30
_ZIP_CENTRAL_HEADER_BYTES = 46
_ZIP_END_RECORD_BYTES = 22


def upload_limit() -> tuple[int, str]:
    """The largest package ``ray job submit`` can upload, and where it comes from.

    Returns:
        ``(limit_bytes, source)``: a package of ``limit_bytes`` passes, one byte
        more is refused; ``source`` names the Ray constant that binds.
    """
    from ray._private import ray_constants
    from ray._private.runtime_env import packaging

    http_limit = int(ray_constants.DASHBOARD_CLIENT_MAX_SIZE)
    gcs_limit = int(packaging.GCS_STORAGE_MAX_SIZE) - 1  # stored only if < limit
    if http_limit <= gcs_limit:
        return http_limit, (
            "ray._private.ray_constants.DASHBOARD_CLIENT_MAX_SIZE (the dashboard's "
            "HTTP request body limit for job submissions)"
        )
    return gcs_limit, (
        "ray._private.runtime_env.packaging.GCS_STORAGE_MAX_SIZE (the GCS package "
        "limit, RAY_max_grpc_message_size)"
    )


@dataclass
class PackageMeasure:
    """What a working_dir upload would hold."""

    root: Path
    excludes: list[str]
    num_files: int = 0
    file_bytes: int = 0
    package_bytes: int = 0  # the zip Ray builds (stored, not compressed)
    files: list[tuple[str, int]] = field(default_factory=list)  # (path, bytes)

    def biggest_files(self, n: int = 10) -> list[tuple[str, int]]:
        return sorted(self.files, key=lambda f: (-f[1], f[0]))[:n]

    def biggest_folders(self, n: int = 5) -> list[tuple[str, int]]:
        """Top-level folders (and files) of the package by bytes shipped."""
        sums: dict[str, int] = defaultdict(int)
        for path, size in self.files:
            top = path.split("/", 1)[0] + ("/" if "/" in path else "")
            sums[top] += size
        return sorted(sums.items(), key=lambda f: (-f[1], f[0]))[:n]


def _mib(num_bytes: float) -> str:
    return f"{num_bytes / 1024**2:.1f} MiB"


def measure_package(working_dir: str | Path, excludes: Sequence[str]) -> PackageMeasure:
    """Walk ``working_dir`` the way Ray packages it and add up what would ship.

    Uses Ray's own traversal (its default excludes, ``.gitignore``/``.rayignore``
    files unless ``RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1``, then ``excludes``) and
    the layout of the stored zip Ray writes, so ``package_bytes`` is the size of
    the upload without building it.

    Raises:
        ConfigError: ``working_dir`` is not a directory.
    """
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    root = Path(working_dir).absolute()
    if not root.is_dir():
        raise ConfigError(f"working dir {str(root)!r} is not a directory")
    all_excludes = ray_constants.get_runtime_env_default_excludes() + list(excludes)
    include_gitignore = (
        os.environ.get(ray_constants.RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"
    )
    measure = PackageMeasure(root=root, excludes=list(excludes))
    package_bytes = _ZIP_END_RECORD_BYTES

    def visit(path: Path) -> None:
        nonlocal package_bytes
        is_empty_dir = path.is_dir() and next(path.iterdir(), None) is None
        if not (is_empty_dir or path.is_file()) or path == root:
            return
        name = path.relative_to(root).as_posix() + ("/" if is_empty_dir else "")
        size = 0 if is_empty_dir else path.stat().st_size
        name_bytes = len(name.encode("utf-8"))
        package_bytes += (
            _ZIP_LOCAL_HEADER_BYTES + _ZIP_CENTRAL_HEADER_BYTES + 2 * name_bytes + size
        )
        if not is_empty_dir:
            measure.num_files += 1
            measure.file_bytes += size
            measure.files.append((name, size))

    _dir_travel(
        root,
        [_get_excludes(root, all_excludes)],
        visit,
        include_gitignore=include_gitignore,
        logger=logger,
    )
    measure.package_bytes = package_bytes
    return measure


def check_package_size(
    measure: PackageMeasure,
    limit_bytes: int | None = None,
    source: str = "the caller",
) -> None:
    """Refuse a package Ray's job API would refuse.

    Args:
        measure: what the upload would hold.
        limit_bytes: the limit; default Ray's (`upload_limit`).
        source: where ``limit_bytes`` comes from, for the message.

    Raises:
        PackageTooLarge: naming the size, the limit and the biggest files and
            folders, with the way to leave them out.
    """
    if limit_bytes is None:
        limit_bytes, source = upload_limit()
    if measure.package_bytes <= limit_bytes:
        return
    lines = [
        f"the job package from {measure.root} is {_mib(measure.package_bytes)} "
        f"({measure.num_files} files), over Ray's job upload limit of "
        f"{_mib(limit_bytes)} ({limit_bytes} bytes, set by {source}).",
        "Biggest files:",
    ]
    lines += [f"  {_mib(size):>11}  {path}" for path, size in measure.biggest_files()]
    lines.append("Biggest top-level entries:")
    lines += [f"  {_mib(size):>11}  {p}" for p, size in measure.biggest_folders()]
    lines.append(
        "Leave them out: add patterns to `excludes` in jobs/runtime_env.yaml (or a "
        ".rayignore file), keep data and weights outside the project and pass "
        "their absolute paths to the job."
    )
    raise PackageTooLarge("\n".join(lines))


def resolve_dashboard_address(explicit: str | None = None) -> str:
    """The job API address: the flag, ``RAY_API_SERVER_ADDRESS``, ``RAY_ADDRESS``,
    the cluster ``raysys up`` started, or the default local dashboard."""
    if explicit:
        return explicit
    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        if os.environ.get(var):
            return os.environ[var]
    from raysys.runtime.local_cluster import running_cluster

    state = running_cluster()
    return state.dashboard_url if state is not None else DEFAULT_DASHBOARD_URL


def submit_env(address: str) -> dict[str, str]:
    """The environment ``ray job submit`` runs in: token authentication on.

    An explicit ``RAY_AUTH_MODE`` is kept; a local cluster started with
    ``raysys up --no-auth`` is reached without a token; everything else is
    reached with one.
    """
    env = dict(os.environ)
    if "RAY_AUTH_MODE" in env:
        return env
    from raysys.runtime.local_cluster import running_cluster

    state = running_cluster()
    if state is not None and state.dashboard_url == address and not state.auth:
        return env
    env["RAY_AUTH_MODE"] = "token"
    return env


def submit_command(
    entrypoint: Sequence[str],
    *,
    address: str,
    working_dir: str | Path = PROJECT_ROOT,
    runtime_env_file: str | Path = RUNTIME_ENV_FILE,
    ray_args: Sequence[str] = (),
) -> list[str]:
    """The plain ``ray job submit`` command line that submits ``entrypoint``.

    Raises:
        ConfigError: the entrypoint is empty.
    """
    if not entrypoint:
        raise ConfigError(
            "no entrypoint: put the command after `--`, e.g. "
            "`raysys submit -- python jobs/<job>.py --out /tmp/report.json`"
        )
    if not Path(working_dir).is_dir():
        raise ConfigError(
            f"working dir {str(working_dir)!r} is not a folder; give the project "
            "checkout the job runs from"
        )
    _check_entrypoint_script(entrypoint, Path(working_dir))
    from raysys.runtime.local_cluster import ray_executable

    return [
        ray_executable(),
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        str(working_dir),
        "--runtime-env",
        str(runtime_env_file),
        *ray_args,
        "--",
        *entrypoint,
    ]


def _check_entrypoint_script(entrypoint: Sequence[str], working_dir: Path) -> None:
    """A ``python path/to/job.py`` entrypoint must name a file that will ship."""
    if len(entrypoint) < 2 or not Path(entrypoint[0]).name.startswith("python"):
        return
    script = entrypoint[1]
    if script.startswith("-") or not script.endswith(".py"):
        return
    if not Path(script).is_absolute() and not (working_dir / script).is_file():
        raise ConfigError(
            f"entrypoint script {script!r} is not in the working dir {working_dir}; "
            "jobs run from a copy of it, so give a path relative to it "
            "(e.g. jobs/<job>.py)"
        )


def prepare_submission(
    working_dir: str | Path = PROJECT_ROOT,
    runtime_env_file: str | Path = RUNTIME_ENV_FILE,
) -> PackageMeasure:
    """Measure the package a submission would upload and refuse one too large.

    Raises:
        ConfigError: the runtime_env file is invalid or the working dir missing.
        PackageTooLarge: the package exceeds Ray's upload limit.
    """
    excludes = load_runtime_env(Path(runtime_env_file))["excludes"]
    measure = measure_package(working_dir, excludes)
    limit_bytes, source = upload_limit()
    logger.info(
        "job package: %s in %d files from %s (limit %s)",
        _mib(measure.package_bytes),
        measure.num_files,
        measure.root,
        _mib(limit_bytes),
    )
    check_package_size(measure, limit_bytes, source)
    return measure
