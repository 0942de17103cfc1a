"""Fixtures shared by the model tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hf_reference import save_hf_reference


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread, the more so on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


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
