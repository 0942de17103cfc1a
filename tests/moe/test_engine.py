"""The engine end to end on the session's Ray cluster, with the bundled pair."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from raysys.models.hf import save_model
from raysys.models.llama import Llama, greedy_generate, tiny_llama_config
from raysys.models.tokenizer import ByteTokenizer
from raysys.moe.engine import PRETRAINED, MoEEngine, MoEEngineConfig
from raysys.moe.host import ExpertFetchError
from raysys.moe.policy import CutoffPolicy
from raysys.moe.prompts import BUILTIN_PROMPTS
from raysys.moe.speculative import SamplingParams, generate_speculative
from raysys.runtime.errors import ConfigError

TOKENIZER = ByteTokenizer()
NUM_TOKENS = 48


@pytest.fixture(scope="module")
def engine(ray_cluster):
    config = MoEEngineConfig(
        mode="sd", cache_experts=8, link_bandwidth_bytes_per_s=200e6, num_hosts=2
    )
    with MoEEngine(config) as eng:
        yield eng


@pytest.fixture(scope="module")
def references(pair):
    _, target = pair
    target.set_expert_source(None)
    return [
        greedy_generate(target, TOKENIZER.encode(p), NUM_TOKENS, stop_ids=[257])
        for p in BUILTIN_PROMPTS[:2]
    ]


def test_undersized_cache_gives_the_all_resident_logits(engine, pair):
    _, resident = pair
    resident.set_expert_source(None)
    engine.resize_cache(1)
    try:
        ids = TOKENIZER.encode(BUILTIN_PROMPTS[0])
        prompt, block = torch.tensor([ids[:-6]]), torch.tensor([ids[-6:]])
        with torch.no_grad():
            caches = [engine.target.new_cache(), resident.new_cache()]
            for model, cache in zip((engine.target, resident), caches, strict=True):
                model(prompt, [cache])
            engine.fetcher.end_pass()
            engine.fetcher.take_stats()
            served = engine.target(block, [caches[0]])  # a 6-token verification
            engine.fetcher.end_pass()
            want = resident(block, [caches[1]])
        assert torch.equal(served, want)
        _, cache_stats = engine.fetcher.take_stats()
        assert cache_stats.max_overflow >= 2  # a layer needed several experts
        assert len(engine.fetcher.cache) == 1
    finally:
        engine.resize_cache(8)


@pytest.mark.parametrize(
    ("mode", "cutoff"),
    [("ar", None), ("sd", None), ("sd-prefetch", 2), ("sd-prefetch", 4)],
)
def test_every_mode_reproduces_target_greedy(engine, references, mode, cutoff):
    engine.set_mode(mode, cutoff)
    report = engine.generate(BUILTIN_PROMPTS[:2], NUM_TOKENS)
    assert [o.token_ids for o in report.outputs] == references
    assert report.mode == mode and report.num_tokens == sum(map(len, references))
    assert report.bytes_fetched == report.num_fetches * report.expert_bytes
    assert report.tpot_ms > 0 and 0 < report.cache_hit_rate < 1
    # The link floor is a lower bound on the link time the run really spent.
    decode_tokens = report.num_tokens - report.num_prompts
    floor_ms = report.link_floor_ms_per_token * decode_tokens
    assert floor_ms <= report.num_fetches * report.link_ms_per_expert + 1e-6
    layers = engine.num_layers
    if mode == "ar":  # one token: top-2 distinct experts in every layer
        assert report.experts_per_pass == 2 * layers
    else:
        assert 2 * layers < report.experts_per_pass <= 8 * layers
    assert 0 <= report.held_needed_per_pass <= report.experts_per_pass
    assert report.held_needed_per_pass <= report.cache_experts
    if mode == "ar":
        assert report.acceptance_rate is None and report.num_prefetches == 0
    else:
        assert 0 < report.acceptance_rate <= 1
    if mode == "sd-prefetch":
        assert report.cutoff == cutoff and report.num_prefetches > 0
        assert 0 < report.prefetch_recall <= 1 and 0 < report.prefetch_precision <= 1
    else:
        assert report.prefetch_recall is None


@pytest.mark.parametrize("capacity", [1, 3])
def test_prefetch_never_changes_outputs(engine, references, capacity):
    """Every cutoff, with caches far smaller than a pass needs, decodes the same."""
    engine.resize_cache(capacity)
    try:
        for cutoff in range(engine.num_layers + 1):
            engine.set_mode("sd-prefetch", cutoff)
            report = engine.generate(BUILTIN_PROMPTS[:1], NUM_TOKENS)
            assert report.outputs[0].token_ids == references[0], cutoff
            if cutoff:
                assert report.num_prefetches > 0
    finally:
        engine.resize_cache(8)


def test_auto_cutoff_comes_from_the_measured_profile(engine):
    engine.set_mode("sd-prefetch", "auto")
    decision, profile = engine.decision, engine.profile
    assert 0 <= engine.cutoff <= engine.num_layers
    # The decision is the policy's own on the measured profile, cutoff by cutoff.
    policy = CutoffPolicy()
    cutoffs = range(engine.num_layers + 1)
    assert decision.round_ms == [policy.round_ms(profile, c) for c in cutoffs]
    assert engine.cutoff == decision.cutoff == policy.decide(profile).cutoff
    assert decision.round_ms[engine.cutoff] <= min(decision.round_ms) * 1.01 + 1e-9
    assert profile.capacity == 8 and profile.fetch_ms > 0
    assert all(0 <= r <= 1 for r in profile.recall)
    report = engine.generate(BUILTIN_PROMPTS[2:3], 16)
    assert report.cutoff_decision["cutoff"] == engine.cutoff


def test_killed_expert_host_is_replaced_mid_generation(engine, references):
    engine.set_mode("sd-prefetch", 2)
    engine.resize_cache(2)  # keep fetching after the kill

    def kill_on_fifth_pass(count, kind):
        if kill_on_fifth_pass.start is None:
            kill_on_fifth_pass.start = count
        if count - kill_on_fifth_pass.start == 5:
            engine.pool.kill(0)

    kill_on_fifth_pass.start = None
    engine.on_target_pass = kill_on_fifth_pass
    before = list(engine.pool.num_replacements)
    try:
        report = engine.generate(BUILTIN_PROMPTS[:1], NUM_TOKENS)
    finally:
        engine.on_target_pass = None
        engine.resize_cache(8)
    assert report.outputs[0].token_ids == references[0]
    # One kill, one replacement: the fetch that meets the dead host replaces it
    # once, and the replacement serves every later fetch of its shard.
    assert report.num_host_restarts == 1
    assert engine.pool.num_replacements == [before[0] + 1, *before[1:]]


def test_sampling_mode_samples_as_the_decoding_loop_does(engine, pair, references):
    """Prompt i is sampled with seed + i, exactly as in-process with experts resident."""
    draft, target = pair
    target.set_expert_source(None)
    engine.config.temperature = 0.7
    try:
        engine.set_mode("sd-prefetch", 2, draft_length=4)
        report = engine.generate(BUILTIN_PROMPTS[:2], 20)
    finally:
        engine.config.temperature = 0.0
    assert report.temperature == 0.7
    for i, (prompt, out) in enumerate(
        zip(BUILTIN_PROMPTS[:2], report.outputs, strict=True)
    ):
        params = SamplingParams(
            max_new_tokens=20,
            temperature=0.7,
            stop_ids=engine.stop_ids(),
            generator=torch.Generator().manual_seed(engine.config.seed + i),
        )
        trace = generate_speculative(
            target, draft, TOKENIZER.encode(prompt), params, draft_length=4
        )
        assert out.token_ids == trace.tokens, i
        assert out.token_ids != references[i][:20]  # sampled, not greedy


def test_bad_configs_fail_with_the_fix(engine, tmp_path):
    with pytest.raises(ConfigError, match="cutoff 9 is outside"):
        engine.set_mode("sd-prefetch", 9)
    with pytest.raises(ConfigError, match="not one of"):
        engine.set_mode("fast")
    with pytest.raises(ValueError, match="not both"):
        MoEEngineConfig(cache_experts=2, cache_bytes=10**6)
    with pytest.raises(ConfigError, match="no config.json"):
        MoEEngine(MoEEngineConfig(draft_dir=str(tmp_path)))
    other = Llama(tiny_llama_config(hidden_size=32, num_hidden_layers=4))
    other.init_weights(seed=0)
    save_model(other, tmp_path / "other")
    with pytest.raises(ConfigError, match="structurally matched"):
        MoEEngine(MoEEngineConfig(draft_dir=str(tmp_path / "other")))
    with pytest.raises(ConfigError, match="max_new_tokens must be >= 1"):
        engine.generate(["x"], 0)
    with pytest.raises(ConfigError, match="max_new_tokens 2048 leaves no room"):
        engine.generate(["x"], 2048)


def test_bad_values_are_named_before_any_work(ray_cluster):
    with pytest.raises(ValueError, match="cutoff must be >= 0 or 'auto', got -1"):
        MoEEngineConfig(cutoff="-1")
    with pytest.raises(ValueError, match="cutoff must be 'auto' or a layer count"):
        MoEEngineConfig(cutoff="deep")
    # A cutoff beyond the layers is refused whatever the mode, before hosts start.
    with pytest.raises(ConfigError, match="cutoff 7 is outside"):
        MoEEngine(MoEEngineConfig(mode="ar", cutoff=7))
    with pytest.raises(ConfigError, match="cache_experts 33 is more than"):
        MoEEngine(MoEEngineConfig(cache_experts=33))
    with pytest.raises(ConfigError, match="cache_bytes 100000000 holds 1356"):
        MoEEngine(MoEEngineConfig(cache_bytes=10**8))
    with pytest.raises(ConfigError, match="cache of 3 experts < 4 layers"):
        MoEEngine(MoEEngineConfig(cache_experts=3, cache_policy="layer-lru"))


def test_a_refused_mode_change_leaves_the_engine_as_it_was(engine):
    engine.set_mode("sd", draft_length=4)
    for kwargs, message in [
        ({"mode": "sd-prefetch", "cutoff": 9}, "cutoff 9 is outside"),
        (
            {"mode": "sd", "draft_length": 0},
            "draft_length must be 1 to 16 tokens, got 0",
        ),
        (
            {"mode": "sd", "draft_length": 17},
            "draft_length must be 1 to 16 tokens, got 17",
        ),
        ({"mode": "ar", "draft_length": True}, "draft_length must be 1 to 16"),
    ]:
        with pytest.raises(ConfigError, match=message):
            engine.set_mode(**kwargs)
        assert (engine.mode, engine.cutoff, engine.draft_length) == ("sd", None, 4)


def test_direct_calls_check_the_budget_and_the_token_ids(engine):
    with pytest.raises(ConfigError, match="max_new_tokens must be >= 1, got 0"):
        engine.run_sequence("x", 0, seed=0)
    with pytest.raises(ConfigError, match="max_new_tokens 3000 leaves no room"):
        engine.run_sequence("x", 3000, seed=0)
    with pytest.raises(ConfigError, match="the prompt is empty"):
        engine.generate_ids([], 4)
    vocab = engine.target.config.vocab_size
    for bad in (vocab, -1):
        with pytest.raises(
            ConfigError, match=rf"prompt token 1 is {bad}, outside the model's vocab"
        ):
            engine.generate_ids([65, bad], 4)


def test_prompts_budgets_and_stop_ids_of_the_wrong_kind_are_named(engine):
    with pytest.raises(ConfigError, match="prompts is one str, not a list"):
        engine.generate("abc", 4)  # would be three one-character prompts
    for bad in (123, b"abc", None):
        with pytest.raises(ConfigError, match=rf"prompt 1 is {bad!r}, a \w+, not text"):
            engine.generate(["x", bad], 4)
    for budget in (2.5, 4.0, "4", True):
        with pytest.raises(ConfigError, match="max_new_tokens must be a whole number"):
            engine.generate(["x"], budget)
        with pytest.raises(ConfigError, match="max_new_tokens must be a whole number"):
            engine.generate_ids([65], budget)
    vocab = engine.target.config.vocab_size
    for stop, where in (
        ("ab", " is 'ab'"),
        ([1, vocab], r"\[1\] is"),
        ([1.5], r"\[0\]"),
    ):
        with pytest.raises(ConfigError, match=f"stop_ids{where}"):
            engine.generate_ids([65], 4, stop_ids=stop)
    # A stop id that is one of the greedy tokens ends the sequence there.
    engine.set_mode("ar")
    free = engine.generate_ids([65, 66], 6, stop_ids=[], seed=0).trace.tokens
    assert len(free) == 6
    stopped = engine.generate_ids([65, 66], 6, stop_ids=[free[2]], seed=0)
    assert stopped.trace.tokens == free[: free.index(free[2]) + 1]
    assert stopped.trace.stopped


def test_a_closed_engine_refuses_at_once(ray_cluster):
    from raysys.moe.engine import EngineClosed

    eng = MoEEngine(MoEEngineConfig(mode="ar", cache_experts=8))
    eng.close()
    calls = [
        lambda: eng.generate(["x"], 4),
        lambda: eng.generate_ids([65], 4),
        lambda: eng.run_sequence("x", 4, seed=0),
        lambda: eng.set_mode("sd"),
        lambda: eng.resize_cache(4),
        lambda: eng.calibrate(),
    ]
    for call in calls:  # not after the fetch bound (a minute)
        with pytest.raises(EngineClosed, match="the engine is closed"):
            call()


def test_numpy_and_torch_token_ids_are_served_like_ints(engine):
    # Ids from an array, a tensor or a Ray object are numpy or torch integers.
    import numpy as np

    engine.set_mode("ar")
    ids = engine.tokenizer.encode(BUILTIN_PROMPTS[0])
    want = engine.generate_ids(ids, 4, seed=0).trace.tokens
    for given in (np.array(ids), torch.tensor(ids), [np.int64(t) for t in ids]):
        assert engine.generate_ids(given, 4, seed=0).trace.tokens == want
    with pytest.raises(
        ConfigError, match="prompt token 1 is 300, outside the model.s vocab"
    ):
        engine.generate_ids(np.array([65, 300]), 4)


def test_a_prompt_beyond_the_context_is_clipped_and_counted(engine):
    engine.set_mode("ar")
    text = "def f(x):\n    return x\n" * 120
    ids = engine.tokenizer.encode(text)
    budget = 4
    keep = engine.target.config.max_position_embeddings - budget
    assert len(ids) > keep
    report = engine.generate([text, "x = 1"], budget)
    assert report.num_prompts_clipped == 1
    clipped, short = report.outputs
    assert (clipped.prompt_tokens, clipped.clipped_tokens) == (
        len(ids),
        len(ids) - keep,
    )
    assert short.clipped_tokens == 0
    assert short.prompt_tokens == len(engine.tokenizer.encode("x = 1"))
    # The clipped prompt is served as its last tokens would be on their own.
    alone = engine.generate_ids(ids[-keep:], budget, seed=engine.config.seed)
    assert clipped.token_ids == alone.trace.tokens
    assert alone.clipped_tokens == 0


def test_resize_is_bounded_by_the_model(engine):
    for bad in (0, 33, True):
        with pytest.raises(ConfigError, match=rf"1 to 32 experts .*got {bad}"):
            engine.resize_cache(bad)
    assert engine.capacity == 8 and engine.fetcher.cache.capacity == 8
    # Sizes computed with numpy are sizes like ints.
    import numpy as np

    engine.resize_cache(np.int64(8))
    assert type(engine.capacity) is int and engine.capacity == 8
    engine.set_mode("sd", draft_length=np.int64(3))
    assert type(engine.draft_length) is int and engine.draft_length == 3
    engine.set_mode("sd", draft_length=4)


def test_a_failed_pass_releases_its_pins(engine, references):
    engine.set_mode("sd", draft_length=4)
    fetch = engine.fetcher._fetch
    fetched = []

    def lost_after_a_while(key):
        # The link goes down mid-sequence, so the failing layer's other experts
        # are cache hits, pinned by the pass that then fails.
        if len(fetched) >= 12:
            raise RuntimeError(f"link down for {key}")
        fetched.append(key)
        return fetch(key)

    engine.fetcher._fetch = lost_after_a_while
    try:
        with pytest.raises(ExpertFetchError, match="link down"):
            engine.generate(BUILTIN_PROMPTS[:1], NUM_TOKENS)
    finally:
        engine.fetcher._fetch = fetch
    assert len(engine.fetcher.cache) > 0  # hits were there to pin
    assert not any(e.pins for e in engine.fetcher.cache.entries.values())
    report = engine.generate(BUILTIN_PROMPTS[:1], NUM_TOKENS)
    assert report.outputs[0].token_ids == references[0]


def test_a_prompt_whose_experts_cannot_be_fetched_fails_alone(engine, references):
    engine.set_mode("sd", draft_length=4)
    fetch = engine.fetcher._fetch
    calls = []

    def down_for_the_first_prompt(key):
        calls.append(key)
        if len(calls) == 5:  # one failure, during the first prompt
            raise RuntimeError(f"link down for {key}")
        return fetch(key)

    engine.fetcher._fetch = down_for_the_first_prompt
    try:
        report = engine.generate(BUILTIN_PROMPTS[:2], NUM_TOKENS)
    finally:
        engine.fetcher._fetch = fetch
    (failed,) = report.failed_prompts
    assert (failed.index, failed.prompt) == (0, BUILTIN_PROMPTS[0])
    assert "link down" in failed.error
    # the second prompt is served and reported as if alone
    assert report.num_prompts == 1
    assert [o.prompt for o in report.outputs] == [BUILTIN_PROMPTS[1]]
    assert report.outputs[0].token_ids == references[1]


def test_layer_lru_resize_moves_the_slots_per_layer(ray_cluster):
    config = MoEEngineConfig(mode="ar", cache_experts=4, cache_policy="layer-lru")
    with MoEEngine(config) as eng:
        eng.resize_cache(6)
        assert eng.fetcher.cache.layer_capacity == [2, 2, 1, 1]
        with pytest.raises(ConfigError, match="cache of 3 experts < 4 layers"):
            eng.resize_cache(3)
        assert eng.fetcher.cache.layer_capacity == [2, 2, 1, 1]


def test_with_per_layer_slots_the_held_needed_experts_are_the_hits(ray_cluster):
    # Per-layer slots: a layer's misses evict only that layer's unpinned
    # experts, so every expert held at a round's start that its pass routes to
    # is still there when its layer looks it up, and nothing else can hit.
    config = MoEEngineConfig(
        mode="ar", cache_experts=8, cache_policy="layer-lru",
        link_bandwidth_bytes_per_s=0,
    )  # fmt: skip
    with MoEEngine(config) as eng:
        for mode in ("ar", "sd"):
            eng.set_mode(mode)
            run = eng.run_sequence(BUILTIN_PROMPTS[1], 40, seed=0)
            assert len(run.held_needed) == len(run.pass_experts) > 0
            assert run.cache.num_inflight_hits == 0
            assert run.cache.num_hits == sum(run.held_needed) > 0
            assert all(
                0 <= h <= min(n, 8)
                for h, n in zip(run.held_needed, run.pass_experts, strict=True)
            )


def test_a_store_of_another_model_is_refused_before_any_work(ray_cluster, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(PRETRAINED / "target", store)
    config = json.loads((store / "config.json").read_text())
    (store / "config.json").write_text(json.dumps(config | {"num_local_experts": 4}))
    with pytest.raises(ConfigError, match="has num_local_experts 4, the target's is 8"):
        MoEEngine(MoEEngineConfig(expert_store=str(store)))
    with pytest.raises(ConfigError, match="calibration_tokens 2048 leaves no room"):
        MoEEngine(MoEEngineConfig(calibration_tokens=2048))
