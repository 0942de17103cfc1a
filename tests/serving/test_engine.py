"""The engine on CPU: greedy outputs against the model served alone, KV handoff,
chunk and block boundaries, KV accounting and cancellation."""

from __future__ import annotations

import pytest
import torch

from raysys.models.llama import greedy_generate
from raysys.runtime.errors import ConfigError
from raysys.serving.batching import EngineConfig
from raysys.serving.engine import (
    Engine,
    EngineError,
    Finished,
    FirstToken,
    measure_profile,
)
from raysys.serving.instance import ModelSource
from raysys.serving.profile import LatencyProfile

torch.set_num_threads(1)

CHUNK = 64  # step budget; the KV cache also grows in blocks of 64 positions
# Just below, at and just above one and two chunk/block boundaries.
LENGTHS = (1, 63, 64, 65, 127, 128, 129)


@pytest.fixture(scope="module")
def model():
    return ModelSource(seed=3).build()


def prompt(n: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), generator=generator).tolist()


def drain(engine: Engine, place=None) -> dict[int, tuple[int, ...]]:
    """Step until idle; prefilled requests continue here unless ``place`` handles
    them. Returns the outputs of finished requests."""
    outputs = {}
    for _ in range(10_000):
        if not engine.has_work:
            return outputs
        for event in engine.step():
            if isinstance(event, FirstToken) and event.request_id in engine.seqs:
                if place is None:
                    engine.continue_here(event.request_id)
                else:
                    place(event.request_id)
            elif isinstance(event, Finished):
                outputs[event.request_id] = event.output
    raise AssertionError("engine did not go idle")


def test_batched_chunked_serving_equals_each_prompt_alone(model):
    prompts = [prompt(n, seed=n) for n in LENGTHS]
    expected = [tuple(greedy_generate(model, p, 12, stop_ids=())) for p in prompts]
    engine = Engine(model, EngineConfig(max_step_tokens=CHUNK))
    for i, p in enumerate(prompts):
        engine.add_prefill(i, p, 12, ignore_eos=True)
    outputs = drain(engine)
    assert [outputs[i] for i in range(len(prompts))] == expected
    assert engine.kv_used_tokens == 0
    assert engine.seqs == {}


@pytest.mark.parametrize("length", LENGTHS)
def test_kv_handoff_continues_token_for_token(model, length):
    p = prompt(length, seed=100 + length)
    expected = tuple(greedy_generate(model, p, 10, stop_ids=()))
    sender = Engine(model, EngineConfig(max_step_tokens=CHUNK))
    receiver = Engine(model, EngineConfig(max_step_tokens=CHUNK))
    sender.add_prefill(7, p, 10, ignore_eos=True)

    handoffs = []
    drain(sender, place=lambda rid: handoffs.append(sender.export(rid)))
    (handoff,) = handoffs
    assert handoff.kv.num_tokens == length
    assert sender.holds() == {7: "awaiting"}  # kept until released
    receiver.accept(handoff)
    sender.release(7)
    assert sender.kv_used_tokens == 0 and sender.holds() == {}

    outputs = drain(receiver)
    assert outputs[7] == expected
    assert receiver.kv_used_tokens == 0


def test_stop_token_ends_a_request_unless_ignored(model):
    p = prompt(20, seed=5)
    expected = greedy_generate(model, p, 12, stop_ids=())
    stop = expected[3]
    engine = Engine(model, EngineConfig(), stop_ids=[stop])
    engine.add_prefill(0, p, 12)
    engine.add_prefill(1, p, 12, ignore_eos=True)
    outputs = drain(engine)
    assert outputs[0] == tuple(expected[: expected.index(stop) + 1])
    assert outputs[1] == tuple(expected)


def test_kv_capacity_holds_back_prompts_until_memory_frees(model):
    engine = Engine(model, EngineConfig(max_step_tokens=256), kv_capacity_tokens=50)
    engine.add_prefill(0, prompt(30, 1), 10, ignore_eos=True)  # 40 tokens of KV
    engine.add_prefill(1, prompt(30, 2), 10, ignore_eos=True)  # must wait
    first = engine.step()
    assert [e.request_id for e in first if isinstance(e, FirstToken)] == [0]
    assert engine.kv_used_tokens == 40
    assert engine.holds()[1] == "queued"
    engine.continue_here(0)
    outputs = drain(engine)
    assert set(outputs) == {0, 1}
    assert engine.kv_used_tokens == 0


@pytest.mark.parametrize("where", ["queued", "prefilling", "awaiting", "decoding"])
def test_cancel_frees_kv_in_every_phase(model, where):
    engine = Engine(model, EngineConfig(max_step_tokens=16), kv_capacity_tokens=4096)
    engine.add_prefill(0, prompt(40, 1), 20, ignore_eos=True)
    if where != "queued":
        engine.step()  # 16 of 40 prompt tokens
    if where in ("awaiting", "decoding"):
        engine.step()
        engine.step()
        assert engine.holds() == {0: "awaiting"}
    if where == "decoding":
        engine.continue_here(0)
        engine.step()
    assert engine.holds() == {0: where}
    assert engine.kv_used_tokens == (0 if where == "queued" else 60)
    assert engine.cancel(0)
    assert engine.holds() == {} and engine.kv_used_tokens == 0
    assert not engine.has_work
    assert not engine.cancel(0)


def test_cancel_of_an_accepted_request_before_admission(model):
    sender = Engine(model, EngineConfig())
    sender.add_prefill(3, prompt(10, 3), 5, ignore_eos=True)
    handoffs = []
    drain(sender, place=lambda rid: handoffs.append(sender.export(rid)))
    receiver = Engine(model, EngineConfig())
    receiver.accept(handoffs[0])
    assert receiver.holds() == {3: "incoming"}
    receiver.cancel(3)
    assert receiver.holds() == {} and receiver.kv_used_tokens == 0


def test_bad_requests_fail_alone_with_clear_errors(model):
    engine = Engine(model, EngineConfig(), kv_capacity_tokens=1000)
    context = model.config.max_position_embeddings
    with pytest.raises(EngineError, match=f"needs {context + 1} positions, beyond"):
        engine.add_prefill(0, prompt(context, 1), 2)
    with pytest.raises(EngineError, match="prompt is empty"):
        engine.add_prefill(1, [], 4)
    engine.add_prefill(2, prompt(8, 2), 4, ignore_eos=True)
    with pytest.raises(EngineError, match="already on this engine"):
        engine.add_prefill(2, prompt(8, 2), 4)
    with pytest.raises(EngineError, match="capacity 100"):
        Engine(model, kv_capacity_tokens=100).add_prefill(3, prompt(60, 3), 50)
    with pytest.raises(EngineError, match="not on this engine"):
        engine.export(99)
    assert drain(engine)[2] == tuple(
        greedy_generate(model, prompt(8, 2), 4, stop_ids=())
    )


def test_load_reports_the_work_on_the_engine(model):
    engine = Engine(model, EngineConfig(max_step_tokens=16))
    engine.add_prefill(0, prompt(40, 1), 5, ignore_eos=True)
    engine.add_prefill(1, prompt(10, 2), 5, ignore_eos=True)
    load = engine.load()
    assert (load.num_prefill, load.prefill_tokens) == (2, 50)
    assert load.prefill_pairs == pytest.approx(40**2 + 10**2)
    engine.step()  # 16 tokens of request 0
    load = engine.load()
    assert load.prefill_tokens == 34
    assert load.prefill_pairs == pytest.approx(40**2 - 16**2 + 10**2)


class SyntheticStepClock:
    """A clock that moves only when an engine step runs, by a known cost of the
    work that step did.

    Prefill chunks cost ``a·(end² - past²) + b·tokens`` each, decode work
    ``alpha·context + gamma·sequences``, plus the larger of the fixed costs ``c``
    (prefill) and ``beta`` (decode) present in the step: the cost model of
    `LatencyProfile.step_time_s`. Every third step also takes a ``hiccup_s``
    stall (another process taking the CPU), which the medians must discard.
    """

    def __init__(self, a, b, c, alpha, gamma, beta, hiccup_s=1.0):
        self.a, self.b, self.c = a, b, c
        self.alpha, self.gamma, self.beta = alpha, gamma, beta
        self.hiccup_s = hiccup_s
        self.now_s = 0.0
        self.num_steps = 0

    def __call__(self) -> float:
        return self.now_s

    def run(self, engine: Engine, real_step):
        prefill_before = {id(s): s.num_prefilled for s in engine.prefill_queue}
        prefilling = list(engine.prefill_queue)
        decodable = [*engine.running, *engine.ready]
        context_before = {id(s): len(s.prompt) + len(s.output) for s in decodable}
        output_before = {id(s): len(s.output) for s in decodable}
        events = real_step(engine)

        cost, overhead = 0.0, 0.0
        for seq in prefilling:
            past, end = prefill_before[id(seq)], seq.num_prefilled
            if end > past:
                cost += self.a * (end * end - past * past) + self.b * (end - past)
                overhead = max(overhead, self.c)
        decoded = [s for s in decodable if len(s.output) > output_before[id(s)]]
        if decoded:
            cost += self.alpha * sum(context_before[id(s)] for s in decoded)
            cost += self.gamma * len(decoded)
            overhead = max(overhead, self.beta)
        self.num_steps += 1
        stall = self.hiccup_s if self.num_steps % 3 == 0 else 0.0
        self.now_s += cost + overhead + stall
        return events


STEP_COSTS = dict(a=3e-7, b=2e-5, c=4e-3, alpha=5e-6, gamma=1e-4, beta=2e-3)


def assert_fit_recovers_step_costs(model, monkeypatch, max_step_tokens: int):
    clock = SyntheticStepClock(**STEP_COSTS)
    real_step = Engine.step
    monkeypatch.setattr(Engine, "step", lambda engine: clock.run(engine, real_step))
    profile = measure_profile(
        model,
        EngineConfig(max_step_tokens=max_step_tokens),
        prompt_lengths=(16, 64, 128, 256),
        batch_sizes=(1, 8),
        context_tokens=(32, 128),
        num_decode_steps=3,
        clock=clock,
    )
    assert clock.num_steps > 0
    assert profile.source == "fit"
    fitted = dict(
        a=profile.prefill_s_per_token_sq,
        b=profile.prefill_s_per_token,
        c=profile.prefill_overhead_s,
        alpha=profile.decode_s_per_batch_token,
        gamma=profile.decode_s_per_seq,
        beta=profile.decode_overhead_s,
    )
    assert fitted == pytest.approx(STEP_COSTS, rel=1e-6)


def test_profile_fit_recovers_known_step_costs(model, monkeypatch):
    # A budget that prefills each decode batch (8 x 128 tokens) in one step.
    assert_fit_recovers_step_costs(model, monkeypatch, max_step_tokens=1024)


def test_profile_fit_recovers_step_costs_when_prompts_need_chunks(model, monkeypatch):
    # 8 x 128 prompt tokens under a 256-token budget: four prefill steps, while
    # the first sequences already decode.
    assert_fit_recovers_step_costs(model, monkeypatch, max_step_tokens=256)


def test_measured_profile_is_a_fit_carrying_the_models_kv_size(model):
    # Real wall-clock timings on a shared machine: only what does not depend
    # on how fast the steps ran is checked here.
    profile = measure_profile(
        model,
        EngineConfig(max_step_tokens=256),
        prompt_lengths=(16, 64, 128, 256),
        batch_sizes=(1, 8),
        context_tokens=(32, 128),
        num_decode_steps=3,
        kv_capacity_tokens=4096,
        kv_transfer_bytes_per_s=2e9,
        name="tiny",
    )
    c = model.config
    bytes_per_value = torch.finfo(model.dtype).bits // 8
    assert profile.source == "fit" and profile.name == "tiny"
    assert profile.kv_bytes_per_token == (
        2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * bytes_per_value
    )
    assert (profile.kv_capacity_tokens, profile.kv_transfer_bytes_per_s) == (4096, 2e9)
    assert "prefill of [16, 64, 128, 256] tokens" in profile.notes
    assert "decode of [1, 8] sequences x [32, 128] tokens" in profile.notes


def test_prompt_filling_the_whole_context_gets_its_one_token(model):
    # The last token generated is never fed back, so a prompt of the model's
    # full context still has room for its first token (and one shorter, for two).
    context = model.config.max_position_embeddings
    engine = Engine(model, EngineConfig(max_step_tokens=128), kv_capacity_tokens=2048)
    full, almost = prompt(context, 11), prompt(context - 1, 12)
    engine.add_prefill(0, full, 1, ignore_eos=True)
    engine.add_prefill(1, almost, 2, ignore_eos=True)
    outputs = drain(engine)
    assert outputs[0] == tuple(greedy_generate(model, full, 1, stop_ids=()))
    assert outputs[1] == tuple(greedy_generate(model, almost, 2, stop_ids=()))
    assert engine.kv_used_tokens == 0


@pytest.mark.parametrize(
    "bad,match",
    [
        ([5, 259, 7], "prompt token 1 is 259, outside the model's vocabulary"),
        ([-1, 5], "prompt token 0 is -1, outside"),
        ([1.5, 2], "prompt token 0 is 1.5, not a whole number"),
        ([True, 2], "prompt token 0 is True, not a whole number"),
        ("hello", "the prompt is a str"),
        (torch.tensor(5), "the prompt is 5, not a sequence of token ids"),
    ],
)
def test_a_token_outside_the_vocabulary_is_refused_before_any_step(model, bad, match):
    # Such a token used to reach the batched step and fail its embedding lookup,
    # failing every request sharing that step with it.
    engine = Engine(model, EngineConfig(max_step_tokens=CHUNK))
    good = prompt(20, seed=5)
    engine.add_prefill(0, good, 6, ignore_eos=True)
    with pytest.raises(EngineError, match=match):
        engine.add_prefill(1, bad, 6, ignore_eos=True)
    assert drain(engine) == {0: tuple(greedy_generate(model, good, 6, stop_ids=()))}


@pytest.mark.parametrize("max_new_tokens", [0, -3, 2.5, True])
def test_max_new_tokens_must_be_a_whole_number_of_at_least_one(model, max_new_tokens):
    engine = Engine(model, EngineConfig())
    with pytest.raises(EngineError, match=f"max_new_tokens={max_new_tokens!r}"):
        engine.add_prefill(0, [1, 2, 3], max_new_tokens)
    assert engine.seqs == {}


def test_array_prompts_are_served_like_lists(model):
    import numpy as np

    p = prompt(30, seed=6)
    engine = Engine(model, EngineConfig(max_step_tokens=CHUNK))
    engine.add_prefill(0, np.array(p), 5, ignore_eos=True)
    engine.add_prefill(1, torch.tensor(p), 5, ignore_eos=True)
    outputs = drain(engine)
    expected = tuple(greedy_generate(model, p, 5, stop_ids=()))
    assert outputs == {0: expected, 1: expected}


def test_profile_is_measured_under_a_small_step_budget(model):
    # A budget below the default prompt lengths used to fold them into one
    # length, and the fit refused to run.
    profile = measure_profile(
        model,
        EngineConfig(max_step_tokens=8),
        batch_sizes=(1, 2, 4),
        context_tokens=(8,),
        num_decode_steps=2,
    )
    assert profile.source == "fit"
    assert "prefill of [2, 4, 8] tokens" in profile.notes


@pytest.mark.parametrize(
    "field,value", [("dtype", "float16"), ("device", "gpu"), ("device", "cuda:x")]
)
def test_model_source_refuses_unknown_dtypes_and_devices(field, value):
    # They used to pass and fail inside each instance actor as it started.
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=field):
        ModelSource(**{field: value})
    assert ModelSource(device="cuda:1").device == "cuda:1"


def test_mixed_step_limit_cuts_prompt_chunks_beside_decodes(model):
    # Per-token prefill cost 2^-10 s and a fixed cost of 2^-7 s, no decode
    # cost: a step holding decodes within 2^-7 + 40 x 2^-10 s takes exactly 40
    # prompt tokens; a step without decodes takes the whole token budget.
    profile = LatencyProfile(
        name="hand",
        prefill_s_per_token_sq=0.0,
        prefill_s_per_token=2**-10,
        prefill_overhead_s=2**-7,
        decode_s_per_batch_token=0.0,
        decode_s_per_seq=0.0,
        decode_overhead_s=2**-7,
        kv_capacity_tokens=65536,
        kv_bytes_per_token=1,
        kv_transfer_bytes_per_s=1.0,
    )
    config = EngineConfig(max_step_tokens=256, mixed_step_limit_s=2**-7 + 40 * 2**-10)
    a, b = prompt(20, 7), prompt(129, 8)
    expected = {
        0: tuple(greedy_generate(model, a, 30, stop_ids=())),
        1: tuple(greedy_generate(model, b, 5, stop_ids=())),
    }
    engine = Engine(model, config, profile=profile)
    engine.add_prefill(0, a, 30, ignore_eos=True)
    (first,) = engine.step()  # a alone: no decodes, all 20 tokens at once
    assert isinstance(first, FirstToken)
    engine.continue_here(0)
    engine.add_prefill(1, b, 5, ignore_eos=True)
    seq_b = engine.seqs[1]
    progress = []
    while seq_b.num_prefilled < 129:
        engine.step()
        progress.append(seq_b.num_prefilled)
    assert progress == [40, 80, 120, 129]
    engine.continue_here(1)
    outputs = drain(engine)
    assert outputs == expected
    with pytest.raises(ConfigError, match="mixed_step_limit_s=0.046875 needs"):
        Engine(model, config)
