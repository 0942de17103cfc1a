"""Disaggregated LLM serving with adaptive prefill/decode roles (Arrow) on Ray.

- `trace`: Azure and Mooncake trace readers, the shifting synthetic trace;
- `profile`: latency profiles (fitted, from a file, or a roofline estimate);
- `policy`: Arrow, static split and colocated policies (plain objects);
- `batching`: the local scheduler every instance runs;
- `simulator`: discrete-event replay with the same policies, goodput search;
- `engine`: continuous batching with chunked prefill over `raysys.models`;
- `instance`: the Ray actor around one engine (KV handoff, role, load);
- `front`: dispatch, handoffs, flips, retries and cancellation over actors;
- `realrun`, `metrics`, `plots`: replay wiring, per-request records, PNGs.
"""
