"""raysys: a distributed runtime on Ray for shared GPU machines.

Subsystems:
    runtime: connect to or start Ray, configs, reports, the local cluster.
    sharing: provider-first GPU sharing with checkpoint and migration.
    serving: disaggregated LLM serving with adaptive prefill/decode roles.
    moe: speculative MoE inference with expert prefetching.
    solvers: neural-operator warm starts for Krylov solvers.
    models: torch model code shared by the systems above.
"""

__version__ = "0.1.0"
