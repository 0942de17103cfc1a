"""Fixtures shared by the model tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hf_reference import save_hf_reference

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny GQA Llama saved by transformers (untied embeddings)."""
    path = tmp_path_factory.mktemp("llama")
    save_hf_reference(path, "llama", seed=1)
    return path


@pytest.fixture(scope="session")
def llama(llama_dir):
    """This package's model loaded from `llama_dir`."""
    from raysys.models.hf import load_model

    return load_model(llama_dir)
