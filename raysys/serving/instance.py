"""A serving instance: a Ray actor that runs one engine and carries out orders.

The actor owns an `Engine` and steps it on a thread of its own while there is
work. The front end talks to it only through the methods below; they put an
order in the actor's inbox, which the stepping thread applies between two
steps, so orders never race a forward pass. Orders and what the instance does:

- ``submit_prefill``: queue a prompt;
- ``continue_here``: decode a prefilled request on this instance;
- ``export_kv``: copy a prefilled request's KV into the object store and
  return its reference (the KV stays here until ``release``);
- ``accept_kv``: fetch a handed-over KV from the object store and decode it;
- ``release`` / ``cancel``: drop a request and free its KV;
- ``set_role``: relabel the instance; work already here stays and finishes;
- ``next_events``: wait (bounded) for first tokens and finished requests, with
  the instance's load.

An order that fails (an unknown request, a KV that does not fit) fails alone:
its error goes back to the caller and the instance keeps serving the rest.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import ray
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from raysys.runtime.errors import RaysysError
from raysys.serving.batching import EngineConfig
from raysys.serving.engine import Engine, EngineError, EngineEvent, EngineLoad, Handoff
from raysys.serving.policy import Role
from raysys.serving.profile import LatencyProfile

logger = logging.getLogger(__name__)


class ModelSource(BaseModel):
    """Which weights an instance serves.

    Either a Hugging Face checkpoint folder (``config.json`` + safetensors) in
    ``path``, or, when ``path`` is None, the project's tiny Llama over the byte
    tokenizer, initialised from ``seed`` (every instance builds the same one).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str | None = Field(None, description="HF checkpoint folder; None: tiny model")
    seed: int = Field(0, description="seed of the tiny model's random weights")
    max_position_embeddings: int = Field(
        512, ge=8, description="context length of the tiny model"
    )
    num_hidden_layers: int = Field(2, ge=1, description="layers of the tiny model")
    hidden_size: int = Field(64, ge=8, description="width of the tiny model")
    init_std: float = Field(0.02, gt=0, description="init scale of the tiny model")
    dtype: Literal["float32", "bfloat16", "float64"] = Field(
        "float32", description="float32, bfloat16 or float64"
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'",
    )

    def build(self) -> torch.nn.Module:
        """Load or build the model (on the chosen device, eval mode)."""
        from raysys.models.hf import load_model
        from raysys.models.llama import Llama, tiny_llama_config

        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = {
            "float32": torch.float32,
            "bfloat16": torch.bfloat16,
            "float64": torch.float64,
        }[self.dtype]
        if self.path is not None:
            return load_model(self.path, device=device, dtype=dtype)
        config = tiny_llama_config(
            max_position_embeddings=self.max_position_embeddings,
            num_hidden_layers=self.num_hidden_layers,
            hidden_size=self.hidden_size,
            intermediate_size=2 * self.hidden_size,
        )
        model = Llama(config, dtype=dtype)
        model.init_weights(std=self.init_std, seed=self.seed)
        return model.to(device).eval()


@dataclass(frozen=True)
class InstanceReport:
    """What ``next_events`` and every order return: events and the load."""

    instance_id: int
    role: Role
    events: tuple[EngineEvent, ...]
    load: EngineLoad
    time_s: float


class InstanceError(RaysysError):
    """An order the instance could not carry out."""


class _Order:
    """An inbox entry: a function of the engine and a slot for its result."""

    def __init__(self, apply: Callable[[Engine], Any]) -> None:
        self.apply = apply
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class ServingInstance:
    """One instance: an engine stepped on a thread, driven through an inbox.

    Wrap it with `ray.remote` (see `start_instances`); it also runs in-process,
    which the engine tests use.
    """

    def __init__(
        self,
        instance_id: int,
        role: str,
        source: ModelSource,
        engine: EngineConfig,
        kv_capacity_tokens: int,
        num_threads: int = 1,
        order_timeout_s: float = 30.0,
        profile: LatencyProfile | None = None,
    ) -> None:
        torch.set_num_threads(num_threads)
        self.instance_id = instance_id
        self.role = Role(role)
        model = source.build()
        self.engine = Engine(
            model,
            engine,
            kv_capacity_tokens=kv_capacity_tokens,
            stop_ids=model.config.stop_token_ids,
            clock=time.time,
            profile=profile,
        )
        self.order_timeout_s = order_timeout_s
        self.inbox: queue.Queue[_Order] = queue.Queue()
        self.events: list[EngineEvent] = []
        self.events_ready = threading.Condition()
        # TODO: cancelled keys are kept for the instance's whole life (so a
        # late handoff cannot revive one); a long-lived instance that sees
        # millions of cancels would want them aged out.
        self.cancelled: set[int] = set()
        self.stopping = False
        self.error: str = ""
        self.thread = threading.Thread(target=self._loop, daemon=True, name="engine")
        self.thread.start()
        logger.info(
            "instance %d up as %s (pid %d, %s)",
            instance_id,
            self.role.value,
            os.getpid(),
            model.device,
        )

    # -- the stepping thread -------------------------------------------------------

    def _loop(self) -> None:
        while not self.stopping:
            self._apply_orders(block=not self.engine.has_work)
            if not self.engine.has_work:
                continue
            try:
                new = self.engine.step()
            except Exception as e:  # a step that fails must not kill the instance
                logger.exception("instance %d: step failed", self.instance_id)
                self.error = f"step failed: {e}"
                new = self._fail_all(str(e))
            if new:
                with self.events_ready:
                    self.events.extend(new)
                    self.events_ready.notify_all()

    def _apply_orders(self, block: bool) -> None:
        try:
            order = self.inbox.get(timeout=0.05) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            try:
                order.result = order.apply(self.engine)
            except Exception as e:
                order.error = e
            order.done.set()
            try:
                order = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _fail_all(self, why: str) -> list[EngineEvent]:
        from raysys.serving.engine import Finished

        now = time.time()
        failed = []
        for request_id in list(self.engine.seqs):
            self.engine.cancel(request_id)
            failed.append(Finished(request_id, (), now, error=why))
        return failed

    def _order(self, apply: Callable[[Engine], Any]) -> Any:
        order = _Order(apply)
        self.inbox.put(order)
        if not order.done.wait(self.order_timeout_s):
            raise InstanceError(
                f"instance {self.instance_id} did not apply an order within "
                f"{self.order_timeout_s:g} s"
            )
        if order.error is not None:
            if isinstance(order.error, EngineError | InstanceError):
                raise InstanceError(str(order.error)) from order.error
            raise order.error
        return order.result

    def _report(self, events: tuple[EngineEvent, ...] = ()) -> InstanceReport:
        return InstanceReport(
            self.instance_id, self.role, events, self.engine.load(), time.time()
        )

    # -- orders --------------------------------------------------------------------

    def ready(self) -> InstanceReport:
        """The load, once the model is built (a readiness probe)."""
        return self._report()

    def submit_prefill(
        self,
        request_id: int,
        prompt: list[int],
        max_new_tokens: int,
        ignore_eos: bool = False,
    ) -> InstanceReport:
        """Queue a prompt for prefill."""

        def apply(engine: Engine) -> None:
            self._refuse_cancelled(request_id)
            engine.add_prefill(
                request_id, prompt, max_new_tokens, ignore_eos=ignore_eos
            )

        self._order(apply)
        return self._report()

    def _refuse_cancelled(self, request_id: int) -> None:
        # Checked on the stepping thread, after any cancel order queued before.
        if request_id in self.cancelled:
            raise InstanceError(f"request {request_id} was cancelled")

    def continue_here(self, request_id: int) -> InstanceReport:
        """Decode a prefilled request here."""
        self._order(lambda e: e.continue_here(request_id))
        return self._report()

    def export_kv(self, request_id: int) -> list[ray.ObjectRef]:
        """Put a prefilled request's KV in the object store; return ``[ref]``.

        The list keeps Ray from resolving the reference on the way back, so the
        KV travels from the object store to the receiver without passing
        through the caller.
        """
        handoff: Handoff = self._order(lambda e: e.export(request_id))
        return [ray.put(handoff)]

    def accept_kv(
        self, request_id: int, refs: list[ray.ObjectRef], timeout_s: float = 30.0
    ) -> InstanceReport:
        """Fetch a handed-over KV and decode it here.

        Raises:
            InstanceError: the KV did not arrive in time, or does not fit.
        """
        self._refuse_cancelled(request_id)
        try:
            handoff: Handoff = ray.get(refs[0], timeout=timeout_s)
        except ray.exceptions.GetTimeoutError as e:
            raise InstanceError(
                f"instance {self.instance_id}: KV of request {request_id} did not "
                f"arrive within {timeout_s:g} s"
            ) from e
        if handoff.request_id != request_id:
            raise InstanceError(
                f"KV of request {handoff.request_id} sent as request {request_id}"
            )

        def apply(engine: Engine) -> None:
            self._refuse_cancelled(request_id)
            engine.accept(handoff)

        self._order(apply)
        return self._report()

    def release(self, request_id: int) -> InstanceReport:
        """Drop a request whose KV now lives elsewhere."""
        self._order(lambda e: e.release(request_id))
        return self._report()

    def cancel(self, request_id: int) -> InstanceReport:
        """Drop a request wherever it is here and refuse it from now on."""
        self.cancelled.add(request_id)
        self._order(lambda e: e.cancel(request_id))
        return self._report()

    def set_role(self, role: str) -> InstanceReport:
        """Relabel the instance; requests already here are kept."""
        old, self.role = self.role, Role(role)
        logger.info(
            "instance %d: role %s -> %s (%d requests kept)",
            self.instance_id,
            old.value,
            self.role.value,
            len(self.engine.seqs),
        )
        return self._report()

    def next_events(self, timeout_s: float = 0.05) -> InstanceReport:
        """Events since the last call, waiting up to ``timeout_s`` for one."""
        with self.events_ready:
            if not self.events:
                self.events_ready.wait(timeout_s)
            events, self.events = tuple(self.events), []
        return self._report(events)

    def model_limits(self) -> tuple[int, int]:
        """``(vocab_size, max_positions)`` of the served model."""
        return self.engine.vocab_size, self.engine.max_positions

    def holds(self) -> dict[int, str]:
        """Request id -> phase of every request on this instance."""
        return self._order(lambda e: e.holds())

    def stop(self) -> None:
        """Stop stepping (the actor itself is killed by its owner)."""
        self.stopping = True
        self.thread.join(timeout=5.0)


class InstanceSpec(BaseModel):
    """How instances are started."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: ModelSource = Field(default_factory=ModelSource)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    kv_capacity_tokens: int = Field(
        16384, ge=16, description="KV tokens each instance may hold"
    )
    num_cpus: float = Field(0.5, ge=0, description="logical CPUs per instance actor")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per instance actor")
    num_threads: int = Field(1, ge=1, description="torch threads per instance")
    max_concurrency: int = Field(
        8, ge=2, description="concurrent calls an actor serves (orders + long polls)"
    )
    profile: LatencyProfile | None = Field(
        None,
        description="latency profile of an instance; needed when "
        "engine.mixed_step_limit_s cuts prompt chunks to a step time",
    )

    @model_validator(mode="after")
    def _limit_has_a_profile(self) -> InstanceSpec:
        limit = self.engine.mixed_step_limit_s
        if limit is not None and self.profile is None:
            raise ValueError(
                f"engine.mixed_step_limit_s={limit} needs the instances' latency "
                "profile (InstanceSpec.profile)"
            )
        return self


def start_instances(spec: InstanceSpec, roles: list[Role]) -> list[Any]:
    """Start one actor per role (not waiting for them to be ready)."""
    actor_cls = ray.remote(ServingInstance)
    return [
        actor_cls.options(
            num_cpus=spec.num_cpus,
            num_gpus=spec.num_gpus,
            max_concurrency=spec.max_concurrency,
            max_restarts=0,
        ).remote(
            i,
            role.value,
            spec.source,
            spec.engine,
            spec.kv_capacity_tokens,
            spec.num_threads,
            profile=spec.profile,
        )
        for i, role in enumerate(roles)
    ]
