"""Fixtures of the MoE tests: the bundled draft/target pair and local experts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support import shared_data

from raysys.models.hf import load_model
from raysys.models.llama import Llama
from raysys.models.mixtral import ExpertStore, Mixtral
from raysys.moe.engine import PRETRAINED

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def pair() -> tuple[Llama, Mixtral]:
    """The bundled draft and target, float32, target experts resident."""
    draft = load_model(PRETRAINED / "draft", dtype=torch.float32)
    target = load_model(PRETRAINED / "target", dtype=torch.float32)
    assert isinstance(draft, Llama) and isinstance(target, Mixtral)
    return draft, target


@pytest.fixture(scope="session")
def expert_store(pair) -> ExpertStore:
    """Every target expert in host memory (the all-resident reference)."""
    return ExpertStore.from_model(pair[1])


@pytest.fixture(scope="session")
def mt_bench_path() -> Path:
    """The MT-Bench questions from the shared real-data folder (skip when absent)."""
    return shared_data("prompts/mt_bench_questions.jsonl")
