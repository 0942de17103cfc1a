"""Mixtral against transformers; expert sources, routing records and upcycling."""

from __future__ import annotations

import pytest
import torch
from hf_reference import save_hf_reference

from raysys.models.hf import load_model
from raysys.models.llama import Llama, decode_step, prefill, tiny_llama_config
from raysys.models.mixtral import (
    ExpertSource,
    ExpertStore,
    Mixtral,
    MixtralConfig,
    tiny_mixtral_config,
    upcycle,
)
from raysys.runtime.errors import ConfigError

ATOL, RTOL = 2e-5, 1e-4


def close(a, b):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


def tokens_like(num_tokens: int, seed: int, batch: int | None = None, vocab: int = 97):
    generator = torch.Generator().manual_seed(seed)
    shape = (num_tokens,) if batch is None else (batch, num_tokens)
    return torch.randint(0, vocab, shape, generator=generator)


class RecordingSource:
    """An ExpertSource over a store that records every request."""

    def __init__(self, store: ExpertStore) -> None:
        self.store = store
        self.requests: list[tuple[int, list[int]]] = []

    def get_experts(self, layer_idx, expert_ids):
        self.requests.append((layer_idx, list(expert_ids)))
        return self.store.get_experts(layer_idx, expert_ids)


@pytest.fixture(scope="module")
def reference_pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral")
    reference = save_hf_reference(path, "mixtral", seed=2)
    return reference, load_model(path), path


@pytest.mark.parametrize("tied", [False, True])
def test_logits_and_routing_match_transformers(tmp_path, tied):
    reference = save_hf_reference(
        tmp_path, "mixtral", seed=3, tie_word_embeddings=tied, num_local_experts=5
    )
    model = load_model(tmp_path)
    assert isinstance(model, Mixtral) and model.config.num_local_experts == 5
    tokens = tokens_like(24, seed=4, batch=2)
    with torch.no_grad():
        out = reference(tokens, output_router_logits=True)
        close(model(tokens), out.logits)
    for layer, routing in enumerate(model.last_routing()):
        expected_logits = out.router_logits[layer]  # (B*T, E)
        close(routing.router_logits, expected_logits)
        expected_ids = torch.topk(expected_logits.softmax(-1), 2, dim=-1).indices
        assert torch.equal(routing.expert_ids, expected_ids)
        close(routing.weights.sum(-1), torch.ones(48))


def test_expert_source_gets_each_layers_experts_once(reference_pair):
    _, model, _ = reference_pair
    tokens = tokens_like(12, seed=5, batch=1)
    with torch.no_grad():
        resident = model(tokens)
        source = RecordingSource(ExpertStore.from_model(model))
        assert isinstance(source, ExpertSource)
        model.set_expert_source(source)
        try:
            served = model(tokens)
        finally:
            model.set_expert_source(None)
    assert torch.equal(served, resident)
    routed = [r.expert_ids.unique().tolist() for r in model.last_routing()]
    assert source.requests == list(enumerate(routed))


def test_model_without_resident_experts_runs_from_a_store(reference_pair):
    _, model, path = reference_pair
    lean = load_model(path, resident_experts=False)
    assert not any(".experts." in name for name in lean.state_dict())
    tokens = tokens_like(9, seed=6, batch=1)
    with pytest.raises(RuntimeError, match="no resident experts and no ExpertSource"):
        lean(tokens)
    lean.set_expert_source(ExpertStore.from_model(model))
    with torch.no_grad():
        close(lean(tokens), model(tokens))


def test_cached_decode_and_padding_are_not_routed(reference_pair):
    _, model, _ = reference_pair
    tokens = tokens_like(10, seed=7)
    with torch.no_grad():
        full = model(tokens[None])[0]
        cache = model.new_cache()
        steps = [model(tokens[None, :4], [cache])[0]]
        steps += [decode_step(model, tokens[t : t + 1], [cache]) for t in range(4, 10)]
    close(torch.cat(steps), full)

    first, second = model.new_cache(), model.new_cache()
    prefill(model, tokens[:5], first)
    prefill(model, tokens[:2], second)
    new = tokens_like(3, seed=8, batch=2)
    with torch.no_grad():
        model(new, [first, second], num_new_tokens=[3, 1])
    assert all(r.expert_ids.shape == (4, 2) for r in model.last_routing())


def test_route_scores_hidden_states_like_the_layer(reference_pair):
    _, model, _ = reference_pair
    seen = {}
    tokens = tokens_like(7, seed=9, batch=1)
    with torch.no_grad():
        model(tokens, on_attention=lambda i, h: seen.setdefault(i, h.clone()))
        for layer, routing in enumerate(model.last_routing()):
            predicted = model.route(layer, seen[layer])
            assert torch.equal(predicted.expert_ids, routing.expert_ids)
            close(predicted.router_logits, routing.router_logits)


def test_upcycled_identical_experts_equal_dense():
    dense = Llama(tiny_llama_config())
    dense.init_weights(std=0.1, seed=10)
    moe = upcycle(dense, num_experts=4, top_k=2, router_std=0.5, seed=11)
    assert moe.config.num_local_experts == 4 and moe.config.vocab_size == 259
    tokens = tokens_like(20, seed=12, batch=2, vocab=259)
    with torch.no_grad():
        close(moe(tokens), dense(tokens))
    # The router is random: tokens do spread over different experts.
    assert len(moe.last_routing()[0].expert_ids.unique()) > 2
    # Upcycling copied the weights: training the MoE leaves the dense model alone.
    with torch.no_grad():
        moe.moe_blocks[0].experts[0].w1.weight.add_(1.0)
    assert not torch.equal(
        moe.expert_weights(0, 0).w1, dense.layers[0].mlp.gate_proj.weight
    )


def test_config_checks():
    assert tiny_mixtral_config().num_experts_per_tok == 2
    with pytest.raises(ConfigError, match="num_experts_per_tok 5 exceeds"):
        MixtralConfig.from_hf(
            tiny_mixtral_config().to_hf() | {"num_experts_per_tok": 5}
        )
    with pytest.raises(ConfigError, match="unknown MixtralConfig fields"):
        tiny_mixtral_config(experts=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_with_host_memory_experts_matches_cpu(reference_pair):
    _, model, path = reference_pair
    gpu = load_model(path, device="cuda", resident_experts=False)
    gpu.set_expert_source(ExpertStore.from_model(model, device="cpu"))
    prompts = [tokens_like(n, seed=50 + n) for n in (5, 11)]
    cpu_caches, gpu_caches = [], []
    for prompt in prompts:
        cpu_caches.append(model.new_cache())
        gpu_caches.append(gpu.new_cache())
        prefill(model, prompt, cpu_caches[-1])
        prefill(gpu, prompt.cuda(), gpu_caches[-1])
    step = tokens_like(2, seed=60)
    expected = decode_step(model, step, cpu_caches)
    got = decode_step(gpu, step.cuda(), gpu_caches).cpu()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-3)
