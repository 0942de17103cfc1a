"""Generate with the SP-MoE engine in one mode and report speed and caching.

    python jobs/moe_generate.py --prompts ../shared/data/prompts/mt_bench_questions.jsonl \
        --mode sd-prefetch --cache-experts 8 --cutoff auto --max-new-tokens 64 \
        --out out/moe/generate.json

Prompts come from JSON lines (a ``prompt`` string, or the first of ``turns``),
framed by ``--prompt-template``; without ``--prompts`` the built-in prompts are
used as they are. Writes a `raysys.moe.reports.GenerationReport`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from pydantic import Field

from raysys.moe.engine import MoEEngine, MoEEngineConfig
from raysys.moe.prompts import DEFAULT_TEMPLATE, read_prompts
from raysys.moe.reports import fmt_figure
from raysys.runtime import RaysysError, run_job
from raysys.runtime.config import OutputFile

logger = logging.getLogger("moe_generate")


class GenerateConfig(MoEEngineConfig):
    """Generate for a list of prompts in one engine mode."""

    prompts: str | None = Field(
        None, description="JSON-lines prompt file (default: built-in prompts)"
    )
    num_prompts: int | None = Field(
        None, ge=1, description="use only the first N prompts of the file"
    )
    prompt_template: str = Field(
        DEFAULT_TEMPLATE, description="framing of file prompts; {prompt} is replaced"
    )
    max_new_tokens: int = Field(64, ge=1, description="tokens to generate per prompt")
    out: OutputFile = Field(
        Path("out/moe/generate.json"), description="report JSON path"
    )


def main(cfg: GenerateConfig) -> None:
    prompts = read_prompts(cfg.prompts, cfg.num_prompts, cfg.prompt_template)
    with MoEEngine(MoEEngineConfig.of(cfg)) as engine:
        report = engine.generate(prompts, cfg.max_new_tokens)
    path = report.write(Path(cfg.out))
    print(
        f"{report.mode}: {report.num_tokens} tokens over {report.num_prompts} prompts, "
        f"TPOT {fmt_figure(report.tpot_ms, '.2f', ' ms')}, "
        f"{report.tokens_per_s:.1f} tokens/s, "
        f"acceptance {fmt_figure(report.acceptance_rate, '.3f')}, cutoff {report.cutoff}, "
        f"prefetch recall {fmt_figure(report.prefetch_recall, '.3f')}, "
        f"cache hits {fmt_figure(report.cache_hit_rate, '.3f')}, "
        f"{report.bytes_fetched / 1e6:.1f} MB fetched"
    )
    print(f"report: {path}")
    if report.failed_prompts:
        raise RaysysError(
            f"{len(report.failed_prompts)} of "
            f"{len(report.failed_prompts) + report.num_prompts} prompts failed "
            f"(first: prompt {report.failed_prompts[0].index}: "
            f"{report.failed_prompts[0].error}); the report holds the others"
        )


if __name__ == "__main__":
    sys.exit(run_job(GenerateConfig, main))
