"""Reading and writing HF checkpoints: round trips, transformers compatibility, safety."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from raysys.models.hf import (
    Checkpoint,
    UnsafeCheckpointError,
    load_expert_store,
    load_model,
    read_config,
    save_model,
    save_random_model,
    to_hf_name,
)
from raysys.models.llama import Llama, tiny_llama_config
from raysys.models.mixtral import ExpertStore, Mixtral, tiny_mixtral_config
from raysys.runtime.errors import ConfigError


def tokens_like(num_tokens: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 259, (1, num_tokens), generator=generator)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize("max_shard_bytes", [None, 40_000])
@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_save_load_round_trip(tmp_path, kind, max_shard_bytes):
    config = tiny_llama_config() if kind == "llama" else tiny_mixtral_config()
    model = save_random_model(config, tmp_path, seed=1, max_shard_bytes=max_shard_bytes)
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    if max_shard_bytes is None:
        assert shards == ["model.safetensors"]
    else:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
        assert index["metadata"]["total_size"] == sum(
            t.numel() * t.element_size() for t in model.state_dict().values()
        )
    loaded = load_model(tmp_path)
    assert type(loaded) is type(model) and loaded.config == model.config
    assert_same_weights(loaded, model)


@pytest.mark.parametrize("tied", [False, True])
def test_transformers_reads_what_we_save(tmp_path, tied):
    import transformers

    for kind, config, hf_cls in [
        (
            "llama",
            tiny_llama_config(tie_word_embeddings=tied),
            transformers.LlamaForCausalLM,
        ),
        (
            "mixtral",
            tiny_mixtral_config(tie_word_embeddings=tied, num_key_value_heads=1),
            transformers.MixtralForCausalLM,
        ),
    ]:
        ours = save_random_model(config, tmp_path / kind, seed=2, std=0.2)
        theirs = hf_cls.from_pretrained(tmp_path / kind).eval()
        tokens = tokens_like(16, seed=3)
        with torch.no_grad():
            torch.testing.assert_close(
                ours(tokens), theirs(tokens).logits, atol=2e-5, rtol=1e-4
            )


def test_bfloat16_load_and_checkpoint_dtype(tmp_path):
    save_random_model(tiny_llama_config(), tmp_path, dtype=torch.bfloat16)
    assert read_config(tmp_path).dtype == "bfloat16"
    assert load_model(tmp_path).dtype == torch.bfloat16
    as_float = load_model(tmp_path, dtype=torch.float32)
    assert (
        as_float.dtype == torch.float32
        and as_float.layers[0].mlp.up_proj.weight.dtype == torch.float32
    )


def test_checkpoint_reads_single_experts_lazily(tmp_path):
    model = save_random_model(tiny_mixtral_config(), tmp_path, max_shard_bytes=30_000)
    checkpoint = Checkpoint(tmp_path)
    assert len(checkpoint.files) > 1
    expert = checkpoint.read_expert(1, 3)
    for got, want in zip(expert, model.expert_weights(1, 3), strict=True):
        assert torch.equal(got, want)
    with pytest.raises(KeyError, match="experts.9.w1"):
        checkpoint.read_expert(1, 9)

    # A model without resident experts runs from stores each holding a shard.
    shards = [load_expert_store(tmp_path, [(0, e), (1, e)]) for e in range(4)]
    merged = ExpertStore({k: w for s in shards for k, w in s.experts.items()})
    lean = load_model(tmp_path, resident_experts=False)
    lean.set_expert_source(merged)
    tokens = tokens_like(10, seed=4)
    with torch.no_grad():
        assert torch.equal(lean(tokens), model(tokens))


class _RunsCode:
    """Unpickling this creates a file: proof that a loader unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth"])
def test_pickle_checkpoints_are_refused_unopened(tmp_path, name):
    marker = tmp_path / "unpickled"
    (tmp_path / "config.json").write_text(json.dumps(tiny_llama_config().to_hf()))
    (tmp_path / name).write_bytes(pickle.dumps({"w": _RunsCode(marker)}))
    with pytest.raises(UnsafeCheckpointError, match=rf"{name}.*safetensors"):
        load_model(tmp_path)
    with pytest.raises(UnsafeCheckpointError, match="arbitrary code"):
        load_model(tmp_path / name)
    assert not marker.exists()


def test_bad_checkpoints_get_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_model(tmp_path / "absent")
    with pytest.raises(
        ConfigError, match="no model.safetensors or model.safetensors.index"
    ):
        load_model(tmp_path)
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(ConfigError, match="holds config.json"):
        load_model(tmp_path)

    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="holds a JSON list, not an object"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_bytes(b'{"model_type": "\xff"}')
    with pytest.raises(ConfigError, match="is not valid JSON"):
        read_config(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="model_type 'gpt2' is not supported"):
        read_config(tmp_path)

    model = Llama(tiny_llama_config())
    save_model(model, tmp_path)
    state = {to_hf_name(k, model.config): v for k, v in model.state_dict().items()}
    renamed = {k.replace("up_proj", "fc_in"): v for k, v in state.items()}
    save_file(renamed, tmp_path / "model.safetensors")
    with pytest.raises(
        ConfigError, match=r"missing \['model.layers.0.mlp.up_proj.weight'"
    ):
        load_model(tmp_path)

    wrong = state | {"lm_head.weight": torch.zeros(7, 7)}
    save_file(wrong, tmp_path / "model.safetensors")
    with pytest.raises(ConfigError, match="shapes do not match"):
        load_model(tmp_path)


def test_mixtral_without_resident_experts_cannot_be_saved(tmp_path):
    lean = Mixtral(tiny_mixtral_config(), resident_experts=False)
    with pytest.raises(ValueError, match="without resident experts"):
        save_model(lean, tmp_path)
