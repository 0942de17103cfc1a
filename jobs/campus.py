"""The campus job: NOWS, Arrow serving and SP-MoE as tenants of one shared pool.

On a local cluster (its own, started and stopped here, when none is running;
the one ``raysys up`` started, or ``RAY_ADDRESS``, otherwise) with at least
three provider nodes lending logical GPUs, the sharing platform runs at once:

- a NOWS batch: Darcy instances solved cold and warm-started from the bundled
  neural operator (generated, or ``--darcy FILE`` in the FNO benchmark format);
- an Arrow serving fleet replaying a slice of an LLM trace on real instances
  of the project's tiny Llama (the built-in shifting trace, or ``--trace FILE``,
  Azure CSV or Mooncake JSONL), roles flipping with the load;
- SP-MoE generation for prompts (built-in, or ``--prompts FILE`` in JSON lines)
  with the bundled draft/target pair and experts on expert-host actors.

Part-way through, the owner of the provider holding the most tenants leaves
with a deadline (Ray's node drain) and, once its tenants run again, the
provider holding the most tenants is switched off without warning. The tenants
migrate and carry on from their checkpoints.

    python jobs/campus.py --out out/campus
    python jobs/campus.py --darcy ../shared/data/pde/darcy_test_16.npz \\
        --trace ../shared/data/llm-traces/azure-2023-conv.csv \\
        --prompts ../shared/data/prompts/mt_bench_questions.jsonl --out out/campus

Prints a summary table; writes ``report.json`` and ``timeline.png`` to ``--out``.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator
from tqdm import tqdm

from raysys.runtime import Config, run_job
from raysys.runtime.config import OutputDir, format_validation_error
from raysys.runtime.errors import ClusterError, RaysysError, RemoteTimeout
from raysys.serving.policy import ArrowConfig
from raysys.sharing.store import StoreLocation
from raysys.solvers.krylov import SolverName

logger = logging.getLogger("campus")

SYSTEMS = ("nows", "serving", "moe")
# The built-in serving trace, written next to the report for the serving job.
BUILTIN_TRACE_FILE = "serving-trace.jsonl"


class CampusConfig(Config):
    """All four systems on one shared pool of lent GPUs, with providers leaving."""

    out: OutputDir = Field(
        Path("out/campus"), description="folder for report.json and timeline.png"
    )
    darcy: Path | None = Field(
        None,
        description="Darcy instances file (FNO benchmark .npz/.pt); default: generated",
    )
    trace: Path | None = Field(
        None, description="LLM trace (Azure .csv, Mooncake .jsonl); default: built-in"
    )
    prompts: Path | None = Field(
        None,
        description="prompts in JSON lines ('prompt' or 'turns'); default: built-in",
    )
    store: StoreLocation | None = Field(
        None, description="checkpoint store folder or URI (default: under --out)"
    )
    providers: int = Field(
        3, ge=3, le=16, description="providers the pool needs (>= 3)"
    )
    gpus_per_provider: float = Field(
        1.0, gt=0, description="logical GPUs per provider started here"
    )
    # NOWS
    nows_instances: int = Field(
        16, ge=1, description="instances (generated, or the file's first N)"
    )
    nows_resolution: int = Field(
        64, ge=8, le=512, description="grid of generated instances"
    )
    nows_seed: int = Field(1000, description="seed of generated instances")
    nows_solver: SolverName = Field("cg", description="Krylov solver")
    nows_rtol: float = Field(1e-5, gt=0, lt=1, description="relative tolerance")
    nows_batch: int = Field(4, ge=1, description="instances per step")
    # serving
    serving_requests: int = Field(96, ge=1, description="trace requests replayed")
    serving_window: int = Field(32, ge=1, description="requests per step")
    serving_instances: int = Field(
        4, ge=2, description="serving instances (Arrow needs 2)"
    )
    serving_policy: str = Field("arrow", description="arrow, static or colocated")
    serving_rate_scale: float = Field(
        4.0, gt=0, description="arrival-rate multiplier (the tiny model is fast)"
    )
    serving_ttft_slo_s: float = Field(0.1, gt=0, description="TTFT target, s")
    serving_tpot_slo_s: float = Field(0.02, gt=0, description="TPOT target, s")
    serving_arrow: dict[str, float] = Field(
        {"cooldown_s": 2.0, "num_intervals": 2, "monitor_interval_s": 0.5},
        description="Arrow knobs (a replay of seconds needs a quicker monitor)",
    )
    # MoE
    moe_prompts: int = Field(4, ge=1, description="prompts generated")
    moe_max_new_tokens: int = Field(48, ge=1, description="tokens per prompt")
    moe_mode: str = Field("sd-prefetch", description="ar, sd or sd-prefetch")
    # departures
    drain_deadline_s: float = Field(
        30.0, gt=0, description="deadline of the owner who leaves"
    )
    systems: list[str] = Field(
        list(SYSTEMS), description="tenants to run: any of nows, serving, moe"
    )
    disrupt: bool = Field(
        True, description="drain one provider and lose another part-way"
    )
    timeout_s: float = Field(900.0, gt=0, description="bound on the whole job, s")

    @model_validator(mode="after")
    def _check(self) -> CampusConfig:
        for name in ("darcy", "trace", "prompts"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"--{name} {path}: no such file")
        if self.serving_policy not in ("arrow", "static", "colocated"):
            raise ValueError(
                f"serving_policy must be arrow, static or colocated, got {self.serving_policy!r}"
            )
        try:
            ArrowConfig(**self.serving_arrow)
        except ValidationError as e:
            raise ValueError(
                f"serving_arrow {self.serving_arrow}: "
                + format_validation_error(ArrowConfig, e, flags=False)
            ) from e
        if self.moe_mode not in ("ar", "sd", "sd-prefetch"):
            raise ValueError(
                f"moe_mode must be ar, sd or sd-prefetch, got {self.moe_mode!r}"
            )
        unknown = sorted(set(self.systems) - set(SYSTEMS))
        if unknown or not self.systems or len(set(self.systems)) < len(self.systems):
            raise ValueError(
                f"systems must be a non-empty subset of {', '.join(SYSTEMS)}, each "
                "named once, got "
                f"{self.systems!r}"
            )
        return self


# ------------------------------------------------------------------- tenants


def tenant_specs(
    cfg: CampusConfig,
) -> dict[str, tuple[type, dict[str, Any], dict[str, Any]]]:
    """Per system: workload class, its arguments and its `WorkloadSpec` fields."""
    from raysys.campus.tenants import MoEGeneration, NowsBatch, ServingFleet

    every = {"every_steps": 1}
    prompts = []
    if "moe" in cfg.systems:
        from raysys.moe.prompts import read_prompts

        prompts = read_prompts(cfg.prompts, cfg.moe_prompts, _prompt_template())
    specs = {
        "nows": (
            NowsBatch,
            dict(
                data=str(cfg.darcy.resolve()) if cfg.darcy else None,
                generate=cfg.nows_instances,
                resolution=cfg.nows_resolution,
                seed=cfg.nows_seed,
                solver=cfg.nows_solver,
                rtol=cfg.nows_rtol,
                batch_size=cfg.nows_batch,
                limit=cfg.nows_instances,
            ),
            dict(gpus=0.25, kind="batch", checkpoint=every),
        ),
        "serving": (
            ServingFleet,
            serving_kwargs(cfg),
            dict(gpus=0.5, kind="interactive", checkpoint=every),
        ),
        "moe": (
            MoEGeneration,
            dict(
                prompts=prompts,
                max_new_tokens=cfg.moe_max_new_tokens,
                engine={"mode": cfg.moe_mode},
            ),
            dict(gpus=0.25, kind="interactive", checkpoint=every),
        ),
    }
    return {name: specs[name] for name in cfg.systems}


def serving_kwargs(cfg: CampusConfig) -> dict[str, Any]:
    """Arguments of the serving tenant (`raysys.campus.tenants.ServingFleet`)."""
    return dict(
        trace=str(cfg.trace.resolve()) if cfg.trace else None,
        num_requests=cfg.serving_requests,
        window=cfg.serving_window,
        instances=cfg.serving_instances,
        policy=cfg.serving_policy,
        ttft_slo_s=cfg.serving_ttft_slo_s,
        tpot_slo_s=cfg.serving_tpot_slo_s,
        rate_scale=cfg.serving_rate_scale,
        arrow=cfg.serving_arrow,
    )


def serving_trace_file(cfg: CampusConfig) -> Path:
    """The trace the serving tenant replays, as a file ``serve_trace.py`` reads:
    ``--trace``, or the built-in trace written next to the report."""
    return cfg.trace or cfg.out / BUILTIN_TRACE_FILE


def write_builtin_trace(cfg: CampusConfig) -> Path:
    """Write the built-in serving trace as Mooncake JSON lines (timestamps in ms)."""
    import json

    from raysys.campus.tenants import ServingFleet

    trace = ServingFleet(**serving_kwargs(cfg)).builtin_trace()
    path = cfg.out / BUILTIN_TRACE_FILE
    with path.open("w") as f:
        for r in trace.requests:
            row = {
                "timestamp": 1000.0 * r.arrival_s,
                "input_length": r.prompt_tokens,
                "output_length": r.output_tokens,
            }
            f.write(json.dumps(row) + "\n")
    return path


def nows_data_file(cfg: CampusConfig) -> Path | None:
    """The instances the NOWS tenant solves, as a file ``nows_solve.py --data``
    reads: ``--darcy``, or its first ``--nows-instances`` written next to the
    report when it holds more."""
    if cfg.darcy is None:
        return None
    subset = cfg.out / f"{cfg.darcy.stem}-first{cfg.nows_instances}.npz"
    return subset if subset.is_file() else cfg.darcy


def write_darcy_subset(cfg: CampusConfig) -> Path | None:
    """Write the first ``--nows-instances`` of ``--darcy`` (coefficients ``a``,
    and ``f`` where given) when the file holds more; None when it does not."""
    import numpy as np

    from raysys.solvers.datasets import load_instances

    instances = load_instances(cfg.darcy)
    path = cfg.out / f"{cfg.darcy.stem}-first{cfg.nows_instances}.npz"
    if len(instances) <= cfg.nows_instances:
        path.unlink(missing_ok=True)
        return None
    first = instances[: cfg.nows_instances]
    arrays = {"a": np.stack([i.fields["a"] for i in first])}
    if all("f" in i.fields for i in first):
        arrays["f"] = np.stack([i.fields["f"] for i in first])
    np.savez(path, **arrays)
    return path


def _prompt_template() -> str:
    from raysys.moe import prompts

    return getattr(prompts, "DEFAULT_TEMPLATE", '"""{prompt}\n"""\n\n')


def describe_inputs(cfg: CampusConfig) -> dict[str, str]:
    inputs = {
        "nows": str(cfg.darcy.resolve())
        if cfg.darcy
        else f"generated: {cfg.nows_instances} Darcy instances, {cfg.nows_resolution}x"
        f"{cfg.nows_resolution}, seed {cfg.nows_seed}",
        "serving": str(cfg.trace.resolve())
        if cfg.trace
        else "built-in shifting trace (seed 0)",
        "moe": str(cfg.prompts.resolve()) if cfg.prompts else "built-in prompts",
    }
    return {name: inputs[name] for name in cfg.systems}


# ------------------------------------------------------------------- figures


def nows_record(cfg: CampusConfig, wid: str, status: str, state: Any) -> dict[str, Any]:
    from raysys.solvers.reports import InstanceResult, summarise

    results = [InstanceResult.model_validate(r) for r in _loads(state, "results")]
    s = summarise(results)
    source = f"--data {nows_data_file(cfg)}" if cfg.darcy else (
        f"--generate {cfg.nows_instances} --resolution {cfg.nows_resolution} "
        f"--seed {cfg.nows_seed}"
    )  # fmt: skip
    return dict(
        name="nows",
        status=status,
        workload_id=wid,
        work=f"{s.num_instances} instances solved cold+warm ({s.num_failed} failed)",
        quality=f"median matvec reduction {_pct(s.median_matvec_reduction)}, "
        f"{s.num_converged_warm}/{s.num_instances} converged warm",
        speed=f"time reduction {_pct(s.time_reduction)} (inference incl.)",
        figures=s.model_dump(mode="json"),
        own_job=f"python jobs/nows_solve.py {source} --solver {cfg.nows_solver} "
        f"--rtol {cfg.nows_rtol:g}",
    )


def serving_record(
    cfg: CampusConfig, wid: str, status: str, state: Any
) -> dict[str, Any]:
    from raysys.serving.metrics import RequestRecord, summarize
    from raysys.serving.policy import SloTargets

    records = [RequestRecord(**r) for r in _loads(state, "records")]
    flips = _loads(state, "flips")
    slo = SloTargets(ttft_s=cfg.serving_ttft_slo_s, tpot_s=cfg.serving_tpot_slo_s)
    s = summarize(records, slo)
    checked, matching = int(state["num_checked"]), int(state["num_matching"])
    figures = s.model_dump(mode="json") | {
        "num_role_flips": len(flips),
        "num_clipped": int(state["num_clipped"]),
        "num_handoffs": sum(r.handoff for r in records),
        "num_retries": sum(r.num_retries for r in records),
        "outputs_checked": checked,
        "outputs_matching_single_instance": matching,
        "flip_times": [f["wall_time"] for f in flips],
    }
    from raysys.campus.tenants import ServingFleet

    fleet = ServingFleet(**serving_kwargs(cfg))
    return dict(
        name="serving",
        status=status,
        workload_id=wid,
        work=f"{s.num_completed}/{s.num_requests} requests, {len(flips)} role flips",
        quality=f"SLO attainment {_pct(s.slo_attainment)}, outputs = alone "
        f"{matching}/{checked}",
        speed=f"TTFT p50 {_secs(s.ttft_p50_s)}, TPOT p50 {_secs(s.tpot_p50_s)}",
        figures=figures,
        own_job=f"python jobs/serve_trace.py --trace {serving_trace_file(cfg)} "
        f"--mode real {fleet.own_job_args()}",
    )


def moe_record(cfg: CampusConfig, wid: str, status: str, state: Any) -> dict[str, Any]:
    from raysys.campus.tenants import moe_figures

    f = moe_figures(_loads(state, "reports"))
    prompts = f"--prompts {cfg.prompts} " if cfg.prompts else ""
    recall = f["prefetch_recall"]
    return dict(
        name="moe",
        status=status,
        workload_id=wid,
        work=f"{f['num_prompts']} prompts, {f['num_tokens']} tokens",
        quality=f"acceptance {_pct(f['acceptance_rate'])}, prefetch recall {_pct(recall)}",
        speed=f"TPOT {f['tpot_ms']:.1f} ms" if f["tpot_ms"] else "TPOT n/a",
        figures=f,
        own_job=f"python jobs/moe_generate.py {prompts}--num-prompts {cfg.moe_prompts} "
        f"--mode {cfg.moe_mode} --max-new-tokens {cfg.moe_max_new_tokens}",
    )


def _loads(state: Any, key: str) -> list:
    import json

    return json.loads(state[key]) if state else []


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _secs(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f} s"


# ---------------------------------------------------------------------- run


class Campus:
    """One campus run: pool, platform, tenants, departures."""

    def __init__(self, cfg: CampusConfig, started: float | None = None) -> None:
        from raysys.campus.report import Timeline
        from raysys.sharing.localpool import LocalPool

        self.cfg = cfg
        # --timeout-s bounds the whole job, the cluster's start-up included.
        self.deadline = (started or time.monotonic()) + cfg.timeout_s
        self.pool = LocalPool("campus")
        self.timeline = Timeline()
        self.client = None
        self.wids: dict[str, str] = {}
        self.departures: list[dict[str, Any]] = []
        self.mode = ""
        self.store = ""

    def start(self) -> None:
        from raysys.sharing import SharingClient

        cfg = self.cfg
        self.mode = self.pool.connect(
            providers=cfg.providers, gpus_per_provider=cfg.gpus_per_provider
        )
        self.check_time("the pool's providers joined")
        missing = cfg.providers - len(self.pool.recorded_providers())
        if missing > 0 and not self.pool.own:
            names = [f"campus-{i}" for i in range(missing)]
            logger.info("adding %d provider node(s) to the pool: %s", missing, names)
            self.pool.add_providers(names, cfg.gpus_per_provider)
        # The working directory of a submitted job is temporary; nodes started
        # from here keep theirs.
        os.chdir(tempfile.gettempdir())
        # A fresh store per run (a tenant name with checkpoints would continue
        # them); the default one is removed after a successful run.
        self.store = cfg.store or str(cfg.out / f"checkpoints-{uuid.uuid4().hex[:6]}")
        store = self.store
        self.client = SharingClient.start(
            store=store,
            controller_name=f"raysys-campus-{uuid.uuid4().hex[:6]}",
            poll_interval_s=0.25,
            heartbeat_interval_s=0.5,
            heartbeat_timeout_s=5.0,
            stop_timeout_s=min(30.0, cfg.drain_deadline_s),
        )
        self.check_time("starting the sharing platform")
        self.client.wait_for_providers(
            cfg.providers, timeout_s=min(180.0, self.time_left_s())
        )

    def time_left_s(self) -> float:
        return self.deadline - time.monotonic()

    def check_time(self, doing: str) -> None:
        """Raise `RemoteTimeout` when --timeout-s ran out before ``doing``."""
        if self.time_left_s() <= 0:
            raise RemoteTimeout(
                f"campus: --timeout-s {self.cfg.timeout_s:g} ran out before "
                f"{doing}; give the job more time (the cluster's start-up counts)"
            )

    def submit(self) -> None:
        from raysys.sharing import WorkloadSpec

        for name, (cls, kwargs, spec) in tenant_specs(self.cfg).items():
            wspec = WorkloadSpec(tenant=f"campus-{name}", name=name, **spec)
            self.wids[name] = self.client.submit(cls, wspec, **kwargs)
            logger.info("submitted %s as %s", name, self.wids[name])

    def run(self) -> Any:
        """Poll until every tenant ends, disrupting providers on the way."""
        cfg = self.cfg
        phase = "warming" if cfg.disrupt else "settled"
        drained: str | None = None
        bar = tqdm(desc="campus steps", unit="step", mininterval=2.0)
        shown = ""
        ended = ("done", "failed", "refused", "cancelled")
        try:
            while True:
                status = self.client.status()
                self.timeline.sample(status)
                mine = [
                    w for w in status.workloads if w.workload_id in self.wids.values()
                ]
                line = " ".join(f"{w.name}:{w.state}@{w.provider}" for w in mine)
                steps = sum(w.step for w in mine)
                if line != shown or steps != bar.n:
                    bar.n, shown = steps, line
                    bar.set_postfix_str(line)
                if all(w.state in ended for w in mine):
                    return status
                if self.time_left_s() < 0:
                    raise RemoteTimeout(
                        f"campus: --timeout-s {cfg.timeout_s:g} ran out (start-up "
                        "included) with tenants still running: "
                        + ", ".join(
                            f"{w.workload_id} ({w.state})"
                            for w in mine
                            if w.state not in ended
                        )  # fmt: skip
                    )
                if phase == "warming" and self._ready(mine):
                    drained = self._busiest(status, exclude=())
                    if drained is not None:
                        self._depart(drained, "drain")
                        self.client.leave(drained, deadline_s=cfg.drain_deadline_s)
                        phase = "draining"
                elif phase == "draining" and self._moved_off(mine, drained):
                    victim = self._busiest(status, exclude=(drained,))
                    if victim is not None:
                        self._depart(victim, "lost")
                        self.pool.kill(victim)
                    phase = "settled"
                time.sleep(0.5)
        finally:
            bar.close()

    @staticmethod
    def _ready(mine: list) -> bool:
        """Every tenant has committed work (or finished), and one still runs."""
        return all(
            w.state == "done"
            or (w.state == "running" and (w.last_checkpoint_step or 0) >= 1)
            for w in mine
        ) and any(w.state == "running" for w in mine)

    @staticmethod
    def _moved_off(mine: list, provider: str | None) -> bool:
        return all(
            w.state == "done" or (w.state == "running" and w.provider != provider)
            for w in mine
        )

    def _busiest(self, status: Any, exclude: tuple) -> str | None:
        running = {w.workload_id for w in status.workloads if w.state == "running"}
        candidates = [
            p for p in status.providers
            if p.phase == "active" and p.name not in exclude
            and any(t in running for t in p.tenants)
        ]  # fmt: skip
        if not candidates:
            logger.warning("no provider holds a running tenant; nothing to disrupt")
            return None
        return max(candidates, key=lambda p: len(p.tenants)).name

    def _depart(self, provider: str, how: str) -> None:
        logger.info(
            "provider %s %s", provider,
            f"drains (owner leaves, deadline {self.cfg.drain_deadline_s:g} s)"
            if how == "drain" else "is lost without warning",
        )  # fmt: skip
        self.timeline.event(provider, how)
        self.departures.append(
            {"provider": provider, "how": how, "at_s": self.timeline.now()}
        )

    def close(self) -> None:
        if self.client is not None:
            try:
                self.client.shutdown()
            except (RemoteTimeout, ClusterError) as e:
                logger.warning("platform shutdown: %s", e)
        self.pool.close()


def build_report(campus: Campus, status: Any, started: float) -> Any:
    from raysys.campus.report import CampusReport, Departure, SystemRecord

    cfg = campus.cfg
    builders = {"nows": nows_record, "serving": serving_record, "moe": moe_record}
    systems = []
    by_id = {w.workload_id: w for w in status.workloads}
    for name, wid in campus.wids.items():
        w = by_id[wid]
        result = campus.client.result(wid)
        try:
            record = builders[name](cfg, wid, w.state, result.final_state)
        except (KeyError, TypeError, ValueError) as e:
            record = dict(name=name, status=w.state, workload_id=wid, work="-",
                          quality="-", speed="-", figures={}, error=str(e))  # fmt: skip
        if w.error:
            record["error"] = w.error
        systems.append(SystemRecord(**record))
    migrations = status.migrations
    m = status.metrics
    departures = []
    for d in campus.departures:
        moves = [x for x in migrations if x.from_provider == d["provider"]]
        departures.append(
            Departure(
                provider=d["provider"],
                how=d["how"],
                at_s=d["at_s"],
                deadline_s=cfg.drain_deadline_s if d["how"] == "drain" else None,
                moved=[x.workload_id for x in moves],
                to={x.workload_id: x.to_provider for x in moves},
                lost_steps={x.workload_id: x.lost_steps or 0 for x in moves},
                succeeded=all(x.succeeded for x in moves),
            )
        )
    systems.append(
        SystemRecord(
            name="sharing",
            status="done",
            work=f"{len(campus.wids)} tenants on {len(status.providers)} providers, "
            f"{len(departures)} departures",
            quality=f"migrations {m['migrations_succeeded']}/"
            f"{m['migrations_attempted']} succeeded, "
            f"{sum(x.lost_steps or 0 for x in migrations)} steps redone",
            speed=f"GPU utilisation {_pct(m.get('gpu_utilization'))}",
            figures={k: v for k, v in m.items() if isinstance(v, int | float | dict)},
            own_job="python jobs/sharing_demo.py",
        )
    )
    serving = next((s for s in systems if s.name == "serving"), None)
    flips = serving.figures.get("flip_times", []) if serving else []
    labels = {wid: name for name, wid in campus.wids.items()}
    plot = campus.timeline.plot(cfg.out / "timeline.png", labels, migrations, flips)
    return CampusReport(
        cluster=campus.mode,
        providers=sorted(p.name for p in status.providers),
        inputs=describe_inputs(cfg),
        systems=systems,
        departures=departures,
        migrations_attempted=m["migrations_attempted"],
        migrations_succeeded=m["migrations_succeeded"],
        migrations=[x.model_dump(mode="json") for x in migrations],
        gpu_utilization=m.get("gpu_utilization"),
        timeline=str(plot),
        elapsed_s=time.monotonic() - started,
    )


def absolute_paths(cfg: CampusConfig) -> None:
    """Make the config's local paths absolute: the run leaves the working directory
    (`Campus.start`), and the tenants read their inputs after that."""
    cfg.out = cfg.out.resolve()
    for name in ("darcy", "trace", "prompts"):
        path = getattr(cfg, name)
        if path is not None:
            setattr(cfg, name, path.resolve())
    if cfg.store is not None and "://" not in cfg.store:
        cfg.store = str(Path(cfg.store).resolve())


def main(cfg: CampusConfig) -> Any:
    from raysys.campus.report import summary_table

    started = time.monotonic()
    absolute_paths(cfg)
    cfg.out.mkdir(parents=True, exist_ok=True)
    tenant_specs(cfg)  # bad prompts or inputs fail before any cluster starts
    if "serving" in cfg.systems and cfg.trace is not None:
        from raysys.serving.trace import load_trace

        load_trace(cfg.trace)  # a bad trace, too
    # the inputs of each system's own job for the same work (`own_job`)
    if "serving" in cfg.systems and cfg.trace is None:
        write_builtin_trace(cfg)
    if "nows" in cfg.systems and cfg.darcy is not None:
        write_darcy_subset(cfg)
    campus = Campus(cfg, started)
    try:
        campus.start()
        campus.submit()
        status = campus.run()
        report = build_report(campus, status, started)
    finally:
        campus.close()
    path = report.write(cfg.out / "report.json")
    print(summary_table(report))
    print(f"report {path}\ntimeline {report.timeline}")
    failed = [s.name for s in report.systems if s.status != "done"]
    if failed:
        raise RaysysError(f"campus: tenants did not finish: {', '.join(failed)}")
    if report.migrations_succeeded != report.migrations_attempted:
        raise RaysysError(
            f"campus: {report.migrations_attempted - report.migrations_succeeded} "
            "migration(s) failed"
        )
    if cfg.store is None:
        shutil.rmtree(campus.store, ignore_errors=True)
    return report


if __name__ == "__main__":
    sys.exit(run_job(CampusConfig, main))
