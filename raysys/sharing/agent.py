"""The provider agent: one actor pinned to each provider's node.

It speaks for the provider's owner. Every ``heartbeat_interval_s`` it tells the
controller that the machine is there and what the owner wishes (lend, or
leave by a deadline); `ProviderAgent.leave` is the owner's kill switch, which
starts Ray's drain of the node with that deadline so Ray schedules nothing new
there. When the platform has moved every tenant off, the agent exits, leaving
the drained node idle, and Ray's raylet takes the node away.

A provider that vanishes stops heartbeating: the controller notices the
silence (and Ray reports the node dead) and evacuates its tenants.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raysys.runtime.errors import ClusterError
from raysys.sharing.drain import drain_node
from raysys.sharing.names import check_name

logger = logging.getLogger(__name__)

NAMESPACE = "raysys"
AGENT_PREFIX = "raysys-agent:"
# Shortest time between a leave and the agent ending itself (see `leave`).
MIN_SELF_END_S = 1.0


def agent_name(provider: str) -> str:
    return AGENT_PREFIX + check_name(provider, "provider")


class ProviderAgent:
    """Heartbeats and the owner's wishes for one provider node."""

    def __init__(
        self, provider: str, controller_name: str, heartbeat_interval_s: float
    ):
        self.provider = check_name(provider, "provider")
        self.controller_name = controller_name
        self.interval_s = heartbeat_interval_s
        self.node_id = ray.get_runtime_context().get_node_id()
        self.started_at = time.time()
        self.wish: dict[str, Any] = {"leave": False, "deadline_at": None}
        self._controller = None
        self._stop = threading.Event()
        threading.Thread(target=self._beat, name="heartbeat", daemon=True).start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if self._controller is None:
                    self._controller = ray.get_actor(
                        self.controller_name, namespace=NAMESPACE
                    )
                # Fire and forget: a slow controller must not stall heartbeats.
                self._controller.heartbeat.remote(
                    self.provider, self.node_id, dict(self.wish), time.time()
                )
            except ValueError:
                self._controller = None  # no controller (yet): keep trying
            except Exception as e:
                logger.debug("heartbeat of %s failed: %s", self.provider, e)
                self._controller = None

    def attach(self, controller_name: str) -> None:
        """Report to ``controller_name`` from now on (the platform that found us)."""
        if controller_name != self.controller_name:
            self.controller_name, self._controller = controller_name, None

    def info(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "node_id": self.node_id,
            "started_at": self.started_at,
            "wish": dict(self.wish),
        }

    def leave(self, deadline_s: float | None, grace_s: float = 10.0) -> dict[str, Any]:
        """The owner takes the machine back.

        Args:
            deadline_s: seconds until the machine goes away; None means
                evacuate at once.
            grace_s: without a deadline, how long tenants get to checkpoint.

        The agent ends itself at the deadline (after ``grace_s`` without one)
        even when no controller tells it to, so the drained node goes idle. A
        second call while the provider is leaving only moves the end earlier:
        the owner's earliest wish wins, a later one is answered with the
        current wish.
        """
        now = time.time()
        window_s = deadline_s if deadline_s is not None else grace_s
        if self.wish.get("leave") and now + window_s >= self.wish["ends_at"]:
            logger.info(
                "provider %s is already leaving (ends in %.1f s); keeping that",
                self.provider,
                self.wish["ends_at"] - now,
            )
            return dict(self.wish)
        # Ray's drain deadline is when the machine goes: the end of the grace
        # when the owner gives no deadline. The controller never lets an owner's
        # end pass the drain's deadline (it reads that when the drain arrives
        # before this wish), so it must not say "now" for a grace.
        deadline_at = drain_node(
            self.node_id,
            deadline_s=window_s,
            reason=f"owner of provider {self.provider} reclaims it",
        )
        self.wish = {
            "leave": True,
            "deadline_at": deadline_at if deadline_s is not None else None,
            "grace_s": grace_s,
            "requested_at": now,
            "ends_at": now + window_s,
        }
        logger.info(
            "provider %s: owner leaves %s",
            self.provider,
            "at once" if deadline_s is None else f"within {deadline_s:.1f} s",
        )
        # Tell the controller now rather than at the next heartbeat.
        if self._controller is not None:
            self._controller.heartbeat.remote(
                self.provider, self.node_id, dict(self.wish), time.time()
            )
        # Started last and never sooner than MIN_SELF_END_S: with a deadline of
        # 0 the agent would otherwise kill itself before this call answers.
        timer = threading.Timer(max(window_s, MIN_SELF_END_S), self._end_self)
        timer.daemon = True
        timer.start()
        return dict(self.wish)

    def _end_self(self) -> None:
        self._stop.set()
        logger.info("provider %s: deadline reached, agent ends", self.provider)
        try:
            ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
        except Exception as e:
            logger.warning(
                "provider %s: agent could not end itself: %s", self.provider, e
            )

    def exit(self) -> None:
        """Stop heartbeating and end this actor (the node can then go idle)."""
        self._stop.set()
        ray.actor.exit_actor()


RemoteAgent = ray.remote(num_cpus=0, max_restarts=0, max_concurrency=4)(ProviderAgent)


def ensure_agent(
    provider: str,
    node_id: str,
    *,
    controller_name: str,
    heartbeat_interval_s: float = 1.0,
):
    """The provider's agent, created pinned to ``node_id`` when it does not exist."""
    try:
        return RemoteAgent.options(
            name=agent_name(provider),
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        ).remote(provider, controller_name, heartbeat_interval_s)
    except Exception as e:
        raise ClusterError(
            f"cannot start the agent of provider {provider!r}: {e}"
        ) from e


def find_agent(provider: str):
    """The running agent of ``provider``.

    Raises:
        raysys.sharing.names.InvalidName: the name breaks the naming rule.
        ClusterError: no agent runs for that provider name.
    """
    name = agent_name(provider)  # an unsafe name is refused as such, not "absent"
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError as e:
        raise ClusterError(
            f"no provider named {provider!r} is running an agent; list providers "
            "with `raysys status`"
        ) from e
