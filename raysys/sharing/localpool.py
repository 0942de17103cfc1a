"""A pool of provider nodes on the machine the driver runs on, for demos and jobs.

`LocalPool` connects a driver to Ray the way every job does (``RAY_ADDRESS``, a
cluster started by ``raysys up``, or, when neither exists, a local cluster it
starts itself and stops afterwards), makes sure the pool has the providers it
needs, and can switch one of them off without warning, as a machine whose plug
is pulled would vanish. Providers are either the ones ``raysys up`` started
(recorded in the cluster state) or ones the pool adds itself.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import uuid

from raysys.runtime import init_ray, local_cluster
from raysys.runtime.errors import ClusterError
from raysys.runtime.ray_env import PROJECT_ROOT

logger = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalPool:
    """The cluster a job runs on and the provider nodes it can switch off."""

    def __init__(self, prefix: str = "pool") -> None:
        self.own = False
        self.state_dir: str | None = None
        self._state_dir_before: str | None = None
        self.state: local_cluster.ClusterState | None = None
        self.cluster_id = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.prefix = prefix
        self.added: dict[str, str] = {}  # provider name -> process marker

    def connect(
        self, *, providers: int = 0, gpus_per_provider: float = 1.0, cpus: int = 2
    ) -> str:
        """Join the running cluster, or start one with ``providers`` providers.

        Returns how the driver is connected (for the report).
        """
        # Nodes started from here inherit this environment: let their workers
        # import this copy of raysys (a submitted job ships it by itself).
        paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
        if str(PROJECT_ROOT) not in paths:
            os.environ["PYTHONPATH"] = os.pathsep.join(
                [str(PROJECT_ROOT), *filter(None, paths)]
            )
        if (
            not os.environ.get("RAY_ADDRESS")
            and local_cluster.running_cluster() is None
        ):
            self.state_dir = tempfile.mkdtemp(prefix=f"raysys-{self.prefix}-")
            self._state_dir_before = os.environ.get("RAYSYS_STATE_DIR")
            os.environ["RAYSYS_STATE_DIR"] = self.state_dir
            cfg = local_cluster.LocalClusterConfig(
                providers=providers,
                gpus_per_provider=gpus_per_provider,
                cpus_per_provider=cpus,
                port=_free_port(),
                dashboard_port=_free_port(),
                object_store_mb=256,
            )
            logger.info(
                "no cluster running: starting a local one (head + %d providers) on "
                "port %d; `RAYSYS_STATE_DIR=%s raysys status` shows it",
                providers,
                cfg.port,
                os.environ["RAYSYS_STATE_DIR"],
            )
            local_cluster.up(cfg)
            self.own = True
        self.state = local_cluster.running_cluster()
        mode = init_ray()
        return "own local cluster" if self.own else mode

    def recorded_providers(self) -> list[str]:
        """Providers of the recorded local cluster (``raysys up``) plus added ones."""
        names = (
            [n.name for n in self.state.nodes if n.kind == "provider"]
            if (self.state)
            else []
        )
        return names + [n for n in self.added if n not in names]

    def add_providers(
        self,
        names: list[str],
        gpus: float,
        *,
        cpus: int = 2,
        object_store_mb: int = 128,
    ) -> None:
        """Start one provider node per name, joined to the connected cluster."""
        import ray

        address = ray.get_runtime_context().gcs_address
        auth = (
            self.state.auth
            if self.state
            else os.environ.get("RAY_AUTH_MODE") == "token"
        )
        cluster_id = self.state.cluster_id if self.state else self.cluster_id
        host = address.rsplit(":", 1)[0]
        for name in names:
            record = local_cluster.start_provider_node(
                address,
                name,
                num_gpus=gpus,
                num_cpus=cpus,
                cluster_id=cluster_id,
                auth=auth,
                object_store_mb=object_store_mb,
                node_ip="127.0.0.1" if host in ("127.0.0.1", "localhost") else None,
                temp_dir=self.state.temp_dir if self.state else None,
            )
            self.added[name] = record.marker

    def kill(self, name: str) -> None:
        """Switch a provider off: its processes vanish at once.

        Raises:
            ClusterError: the provider was neither added here nor recorded by
                ``raysys up`` on this machine, so its processes cannot be found.
        """
        if name in self.added:
            local_cluster.kill_marked(
                local_cluster.NODE_MARKER, self.added.pop(name), 0.0
            )
        elif self.state is not None and self.state.provider(name) is not None:
            local_cluster.kill_node(self.state, name)
        else:
            raise ClusterError(
                f"provider {name!r} was not started on this machine by raysys; "
                "switch it off by hand (or give a provider from `raysys status`)"
            )

    def close(self) -> None:
        """Disconnect; stop the providers added here and the cluster if it is ours."""
        import ray

        ray.shutdown()
        for name in list(self.added):
            self.kill(name)
        if self.own:
            local_cluster.down()
        if self.state_dir is not None:
            # The state folder made for a cluster of our own (its record is
            # gone now, or it never started): removed, the setting restored.
            shutil.rmtree(self.state_dir, ignore_errors=True)
            self.state_dir = None
            if self._state_dir_before is None:
                os.environ.pop("RAYSYS_STATE_DIR", None)
            else:
                os.environ["RAYSYS_STATE_DIR"] = self._state_dir_before
