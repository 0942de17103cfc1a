"""The dense decoder against transformers, and its KV cache against the full forward."""

from __future__ import annotations

import pytest
import torch
from hf_reference import save_hf_reference

from raysys.models.hf import load_model
from raysys.models.kv_cache import KVState
from raysys.models.llama import (
    LlamaConfig,
    decode_step,
    greedy_generate,
    prefill,
    tiny_llama_config,
)
from raysys.runtime.errors import ConfigError

ATOL, RTOL = 2e-5, 1e-4


def tokens_like(num_tokens: int, seed: int, vocab: int = 97, batch: int | None = None):
    generator = torch.Generator().manual_seed(seed)
    shape = (num_tokens,) if batch is None else (batch, num_tokens)
    return torch.randint(0, vocab, shape, generator=generator)


def close(a, b, atol=ATOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=RTOL)


VARIANTS = {
    "gqa-untied": ("llama", {}),
    "mha-tied": ("llama", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    "kv1-headdim": ("llama", {"num_key_value_heads": 1, "head_dim": 16}),
    "llama3-rope": (
        "llama",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            }
        },
    ),
    "linear-rope": (
        "llama",
        {
            "rope_parameters": {
                "rope_type": "linear",
                "rope_theta": 10000.0,
                "factor": 4.0,
            }
        },
    ),
    "mistral-window": ("mistral", {"sliding_window": 8}),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(tmp_path, variant):
    model_type, overrides = VARIANTS[variant]
    reference = save_hf_reference(tmp_path, model_type, seed=3, **overrides)
    model = load_model(tmp_path)
    assert model.config.tie_word_embeddings == bool(
        overrides.get("tie_word_embeddings")
    )
    assert (model.lm_head is None) == model.config.tie_word_embeddings
    tokens = tokens_like(40, seed=4, batch=2)
    with torch.no_grad():
        expected = reference(tokens).logits  # (2, 40, V)
        close(model(tokens), expected)
        # The cached path (chunked, with masks) computes the same logits.
        cache = model.new_cache()
        got = torch.cat(
            [model(chunk, [cache]) for chunk in tokens[:1].split(16, dim=1)], 1
        )
    close(got, expected[:1])


def test_greedy_generate_matches_transformers(tmp_path):
    reference = save_hf_reference(tmp_path, "llama", seed=5, num_key_value_heads=1)
    model = load_model(tmp_path)
    prompt = tokens_like(9, seed=6)
    with torch.no_grad():
        hf_out = reference.generate(
            prompt[None],
            attention_mask=torch.ones(1, 9, dtype=torch.long),
            max_new_tokens=12,
            min_new_tokens=12,
            do_sample=False,
            pad_token_id=0,
        )
    ours = greedy_generate(model, prompt.tolist(), 12, stop_ids=(), chunk_size=4)
    assert ours == hf_out[0, 9:].tolist()
    # A stop id ends generation after it, included.
    stop_at = ours[4]
    first = ours.index(stop_at)
    assert (
        greedy_generate(model, prompt.tolist(), 12, stop_ids=[stop_at])
        == ours[: first + 1]
    )


def test_attention_hook_gives_mlp_input(tmp_path):
    reference = save_hf_reference(tmp_path, "llama", seed=7, num_hidden_layers=3)
    model = load_model(tmp_path)
    tokens = tokens_like(10, seed=8, batch=1)
    seen = {}
    with torch.no_grad():
        model(tokens, on_attention=lambda i, h: seen.setdefault(i, h.clone()))
        hf_hidden = reference(tokens, output_hidden_states=True).hidden_states
        assert sorted(seen) == [0, 1, 2]
        for i in range(2):  # layer i's output is h + mlp(norm(h))
            layer = model.layers[i]
            h = seen[i]
            close(h + layer.mlp(layer.post_attention_layernorm(h)), hf_hidden[i + 1])


def test_incremental_decode_equals_full_forward(llama):
    tokens = tokens_like(16, seed=10)
    with torch.no_grad():
        full = llama(tokens[None])[0]  # (16, V)
        cache = llama.new_cache(block_size=4)  # small blocks: the cache grows
        steps = [llama(tokens[None, :5], [cache])[0]]
        steps += [decode_step(llama, tokens[t : t + 1], [cache]) for t in range(5, 16)]
    assert cache.num_tokens == 16 and cache.capacity >= 16
    close(torch.cat(steps), full)


def test_batched_decode_of_different_lengths_equals_each_alone(llama):
    prompts = [tokens_like(n, seed=n) for n in (3, 9, 17)]
    continuations = tokens_like(5, seed=11, batch=3)
    alone_caches = [llama.new_cache() for _ in prompts]
    for prompt, cache in zip(prompts, alone_caches, strict=True):
        prefill(llama, prompt, cache)
    batch_caches = [cache.clone() for cache in alone_caches]

    for t in range(5):
        batched = decode_step(llama, continuations[:, t], batch_caches)  # (3, V)
        for b, cache in enumerate(alone_caches):
            alone = decode_step(llama, continuations[b, t : t + 1], [cache])[0]
            close(batched[b], alone)
    for alone, batched in zip(alone_caches, batch_caches, strict=True):
        assert alone.num_tokens == batched.num_tokens
        close(alone.export().kv, batched.export().kv)


def test_mixed_prefill_chunk_and_decode_in_one_forward(llama):
    first, second = llama.new_cache(), llama.new_cache()
    prefill(llama, tokens_like(12, seed=12), first)
    prefill(llama, tokens_like(4, seed=13), second)
    alone_first, alone_second = first.clone(), second.clone()
    again = [first.clone(), second.clone()]
    new = tokens_like(6, seed=14, batch=2)  # row 1 brings one token, padded to 6
    with torch.no_grad():
        mixed = llama(new, [first, second], num_new_tokens=[6, 1])  # (2, 6, V)
        close(mixed[0], llama(new[:1], [alone_first])[0])
        close(mixed[1, 0], llama(new[1:, :1], [alone_second])[0, 0])
        last = llama(new, again, [6, 1], last_only=True)  # (2, V)
    assert (first.num_tokens, second.num_tokens) == (18, 5)
    close(last, torch.stack([mixed[0, 5], mixed[1, 0]]))


@pytest.mark.parametrize("num_tokens", [7, 8, 9, 16, 17])
def test_chunked_prefill_equals_one_shot(llama, num_tokens):
    prompt = tokens_like(num_tokens, seed=num_tokens)
    # Cache blocks of 8 positions: chunk and block boundaries coincide.
    one_shot, chunked = llama.new_cache(), llama.new_cache(block_size=8)
    close(
        prefill(llama, prompt, chunked, chunk_size=8), prefill(llama, prompt, one_shot)
    )
    close(chunked.export().kv, one_shot.export().kv)
    token = prompt[-1:]
    close(decode_step(llama, token, [chunked]), decode_step(llama, token, [one_shot]))


def test_truncate_then_continue_equals_fresh(llama):
    prompt, drafted, accepted = (tokens_like(n, seed=20 + n) for n in (12, 4, 3))
    cache = llama.new_cache()
    prefill(llama, torch.cat([prompt, drafted]), cache)
    cache.truncate(12)
    fresh = llama.new_cache()
    prefill(llama, prompt, fresh)
    with torch.no_grad():
        close(llama(accepted[None], [cache]), llama(accepted[None], [fresh]))
    assert cache.num_tokens == fresh.num_tokens == 15
    with pytest.raises(ValueError, match="cannot truncate a cache of 15 tokens to 16"):
        cache.truncate(16)


def test_exported_cache_continues_on_another_instance(llama, llama_dir):
    other = load_model(llama_dir)
    prompt, rest = tokens_like(11, seed=30), tokens_like(6, seed=31)
    cache = llama.new_cache()
    prefill(llama, prompt, cache)
    state = cache.export()
    assert isinstance(state, KVState) and state.kv.device.type == "cpu"
    c = llama.config
    assert state.kv.shape == (
        c.num_hidden_layers,
        2,
        c.num_key_value_heads,
        11,
        c.head_dim,
    )
    assert state.nbytes == cache.nbytes

    imported = other.import_cache(state)
    with torch.no_grad():
        local = llama(rest[None], [cache])
        remote = other(rest[None], [imported])
    close(remote, local)
    assert state.kv.shape[3] == 11  # the export is a copy, not a view of the cache

    bad = KVState(kv=state.kv[:, :, :1])
    with pytest.raises(ValueError, match="does not fit this model"):
        other.import_cache(bad)


def test_sliding_window_incremental_equals_full(tmp_path):
    save_hf_reference(tmp_path, "mistral", seed=40, sliding_window=5)
    model = load_model(tmp_path)
    tokens = tokens_like(20, seed=41)
    with torch.no_grad():
        full = model(tokens[None])[0]
        cache = model.new_cache()
        steps = [model(tokens[None, :3], [cache])[0]]
        steps += [decode_step(model, tokens[t : t + 1], [cache]) for t in range(3, 20)]
    close(torch.cat(steps), full)


def test_config_parses_both_transformers_layouts():
    base = {
        "model_type": "llama",
        "vocab_size": 10,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    }
    scaling = {"factor": 2.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    scaling["original_max_position_embeddings"] = 64
    v4 = LlamaConfig.from_hf(
        base | {"rope_theta": 5e5, "rope_scaling": scaling | {"type": "llama3"}}
    )
    v5 = LlamaConfig.from_hf(
        base | {"rope_parameters": scaling | {"rope_type": "llama3", "rope_theta": 5e5}}
    )
    assert v4 == v5
    assert v4.rope_theta == 5e5 and v4.rope_scaling.factor == 2.0
    assert v4.num_key_value_heads == 2 and v4.head_dim == 4
    assert LlamaConfig.from_hf(v4.to_hf()) == v4


@pytest.mark.parametrize(
    "bad, named",
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn'"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "'dynamic'"),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
        ({"num_key_value_heads": 3}, "num_key_value_heads 3"),
    ],
)
def test_config_rejects_unsupported_options(bad, named):
    base = tiny_llama_config().to_hf()
    with pytest.raises(ConfigError, match=named):
        LlamaConfig.from_hf(base | bad)


def test_unknown_factory_field_and_context_overflow():
    with pytest.raises(ConfigError, match="num_layers"):
        tiny_llama_config(num_layers=3)
    from raysys.models.llama import Llama

    model = Llama(tiny_llama_config(max_position_embeddings=8))
    cache = model.new_cache()
    prefill(model, torch.arange(6), cache)
    with pytest.raises(
        ValueError, match="beyond the model's max_position_embeddings 8"
    ):
        prefill(model, torch.arange(3), cache)


def test_attention_mask_with_padding_and_window():
    from raysys.models.llama import attention_mask

    mask, is_causal = attention_mask([2, 0], [2, 1], 2, window=2, cached=True)
    expected = torch.tensor(
        [[[0, 1, 1, 0], [0, 0, 1, 1]], [[1, 0, 0, 0], [1, 0, 0, 0]]], dtype=torch.bool
    )
    assert not is_causal and torch.equal(mask[:, 0], expected)
    assert attention_mask([0], [5], 5, None, cached=False) == (None, True)
    assert attention_mask([7], [1], 1, None, cached=True) == (None, False)
    assert attention_mask([7], [1], 1, 7, cached=True)[0] is not None
