"""The shared runtime: Ray connection, configs, reports, errors, local cluster."""

from raysys.runtime.config import Config, load_config, validate_config
from raysys.runtime.entry import run_job, setup_logging
from raysys.runtime.errors import (
    ClusterError,
    ConfigError,
    RaysysError,
    RemoteTimeout,
    UnsatisfiableResources,
)
from raysys.runtime.ray_env import (
    PROJECT_ROOT,
    bounded_get,
    cluster_gpus,
    init_ray,
    project_runtime_env,
)
from raysys.runtime.reports import Report, write_json

__all__ = [
    "PROJECT_ROOT",
    "ClusterError",
    "Config",
    "ConfigError",
    "RaysysError",
    "RemoteTimeout",
    "Report",
    "UnsatisfiableResources",
    "bounded_get",
    "cluster_gpus",
    "init_ray",
    "load_config",
    "project_runtime_env",
    "run_job",
    "setup_logging",
    "validate_config",
    "write_json",
]
