"""Reports of MoE generation and of the benchmark (pydantic, written as JSON)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from raysys.runtime import Report


class SequenceOutput(BaseModel):
    """One prompt's generation."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="the prompt as given to the model")
    text: str = Field(description="the generated text")
    token_ids: list[int] = Field(description="the generated token ids")
    num_tokens: int = Field(description="generated tokens")
    ttft_ms: float = Field(description="time to the first token")
    tpot_ms: float | None = Field(description="time per output token after the first")
    stopped: bool = Field(description="ended on a stop token (else at the budget)")
    prompt_tokens: int = Field(description="tokens of the prompt as given")
    clipped_tokens: int = Field(
        description="leading prompt tokens dropped so the prompt and its budget fit "
        "the model's context"
    )


class FailedPrompt(BaseModel):
    """A prompt whose generation failed (an expert that could not be fetched)."""

    model_config = ConfigDict(extra="forbid")

    index: int = Field(description="position among the prompts")
    prompt: str = Field(description="the prompt as given")
    error: str = Field(description="why it failed")


class GenerationReport(Report):
    """Speed, acceptance, prediction and caching of one engine mode over prompts."""

    mode: str = Field(description="ar, sd or sd-prefetch")
    cutoff: int | None = Field(description="layers prefetched while drafting")
    cutoff_decision: dict | None = Field(
        description="how the cutoff was chosen: predicted round time per cutoff"
    )
    draft_length: int | None = Field(description="tokens drafted per round")
    temperature: float = Field(description="0: greedy")
    max_new_tokens: int = Field(description="budget per prompt")
    num_prompts: int = Field(description="prompts generated")
    num_prompts_clipped: int = Field(
        description="prompts clipped to their last tokens to fit the context"
    )
    num_tokens: int = Field(description="tokens generated in all")
    tpot_ms: float | None = Field(description="time per output token after the first")
    tokens_per_s: float = Field(description="tokens over wall time, prefill included")
    ttft_ms: float = Field(description="mean time to the first token")
    acceptance_rate: float | None = Field(description="drafted tokens accepted")
    tokens_per_round: float | None = Field(
        description="tokens emitted per verification pass"
    )
    prefetch_precision: float | None = Field(
        description="predicted experts (layers below the cutoff) the pass routed to"
    )
    prefetch_recall: float | None = Field(
        description="routed experts (layers below the cutoff) that were predicted"
    )
    predictor_precision: float | None = Field(
        description="the same over every predicted layer (every layer with "
        "score_all_layers)"
    )
    predictor_recall: float | None = Field(
        description="recall over every predicted layer"
    )
    predictor_top1: float | None = Field(
        description="tokens whose top-1 expert was predicted exactly"
    )
    predictor_recall_per_layer: list[float | None] = Field(
        description="predictor recall of each layer"
    )
    cache_experts: int = Field(description="cache capacity in experts")
    num_experts_total: int = Field(description="experts of the model (all layers)")
    cache_hit_rate: float | None = Field(
        description="expert lookups of decoding found ready in the cache"
    )
    cache_inflight_rate: float | None = Field(
        description="lookups found already being fetched (a prefetch in flight)"
    )
    num_evictions: int = Field(description="experts evicted while decoding")
    max_cache_overflow: int = Field(
        description="most experts held above capacity (pinned by one layer)"
    )
    experts_per_pass: float | None = Field(
        description="distinct experts (all layers) one decoding target pass routes "
        "to: one token's in ar, the union over the verified block in sd modes"
    )
    held_needed_per_pass: float | None = Field(
        description="of a pass's experts, those already held in the cache when its "
        "round began; a prefetch while drafting can only take the other slots"
    )
    link_floor_ms_per_token: float | None = Field(
        description="link time per output token that no cache policy or prefetch "
        "can avoid: experts a pass routes to beyond what the cache can hold when "
        "its round begins, times the modelled transfer"
    )
    bytes_fetched: int = Field(description="bytes moved while decoding")
    prefill_bytes_fetched: int = Field(description="bytes moved by the prefills")
    num_fetches: int = Field(description="expert transfers while decoding")
    num_prefetches: int = Field(description="of those, prefetches")
    num_prefetch_dropped: int = Field(description="predicted experts never fetched")
    expert_bytes: int = Field(description="bytes of one expert as stored and moved")
    link_bandwidth_bytes_per_s: float | None = Field(
        description="modelled link bandwidth (None: not modelled)"
    )
    link_ms_per_expert: float = Field(description="modelled transfer of one expert")
    fetch_ms_mean: float | None = Field(
        description="measured transfer time per expert (link model included)"
    )
    fetch_real_ms_mean: float | None = Field(
        description="measured Ray object-store get per expert, without the link"
    )
    stall_ms_per_token: float | None = Field(
        description="compute waiting for experts, per output token"
    )
    draft_ms_per_token: float | None = Field(
        description="one draft forward (predictor included)"
    )
    num_hosts: int = Field(description="expert host actors")
    num_host_restarts: int = Field(description="hosts replaced during the run")
    outputs: list[SequenceOutput] = Field(description="per prompt that finished")
    failed_prompts: list[FailedPrompt] = Field(
        default_factory=list,
        description="prompts that failed; the others are reported without them",
    )


def fmt_figure(value: float | None, spec: str, unit: str = "") -> str:
    """A report figure for printing; ``None`` (TPOT when every output is one
    token, the acceptance of ar) prints as n/a."""
    return "n/a" if value is None else f"{value:{spec}}{unit}"
