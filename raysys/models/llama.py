"""Llama-architecture decoder (Llama 2/3, Mistral) with a per-sequence KV cache.

A compact decoder in the style of gpt-fast: RMSNorm, rotary position embeddings
(the Hugging Face "rotate half" layout, so HF checkpoints load unchanged),
grouped-query attention and a SwiGLU MLP (Touvron et al., "Llama 2", 2023). Module
names follow the Hugging Face parameter names minus their ``model.`` prefix, so
loading a checkpoint is a rename-free copy (see `raysys.models.hf`).

KV cache (`raysys.models.kv_cache.KVCache`): one object per sequence, holding keys
and values of every layer for that sequence's tokens so far. A forward takes a batch of B sequences,
each with its own cache and its own number of new tokens; new tokens are padded
on the right to a common T, each sequence's new keys are written at its own
positions, and attention runs over the cached keys padded to the longest sequence
with a mask that hides padding and future keys. The same call covers a prefill
chunk (T > 1, appended to what is cached), a decode step of many sequences at
different positions (T = 1) and a speculative verification (T = k + 1). A cache
can be truncated (drafted tokens rejected), cloned, exported as plain CPU tensors
(`KVState`) and imported on another model instance.

Running layer by layer: `Transformer.forward` is `Transformer.prepare`, the
embedding, each decoder layer, `Transformer.commit` and `Transformer.head`, and a
caller may take these steps itself; the ``on_attention`` hook of a forward sees
every layer's attention output (the input of its MLP or MoE block).

Shape letters used in the trailing comments:
    B  sequences in the batch        T  new tokens per sequence (padded)
    S  key positions (cached + new)  D  hidden size
    H  query heads   Hkv  key/value heads   Dh  head dim   F  MLP inner size
    V  vocabulary    L  layers
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import Tensor, nn

from raysys.models.kv_cache import KVCache, KVState
from raysys.models.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE
from raysys.runtime.errors import ConfigError

logger = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

# Called after each layer's attention with (layer index, hidden state (B, T, D)).
AttentionHook = Callable[[int, Tensor], None]


# --------------------------------------------------------------------------- config


class RopeScaling(BaseModel):
    """Rotary-embedding frequency scaling; only the types implemented here parse."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rope_type: Literal["linear", "llama3"] = Field(description="scaling method")
    factor: float = Field(gt=0, description="context extension factor")
    low_freq_factor: float | None = Field(None, description="llama3: low band edge")
    high_freq_factor: float | None = Field(None, description="llama3: high band edge")
    original_max_position_embeddings: int | None = Field(
        None, gt=0, description="llama3: context length the model was trained with"
    )

    @model_validator(mode="after")
    def _check_llama3(self) -> RopeScaling:
        if self.rope_type == "llama3":
            missing = [
                name
                for name in (
                    "low_freq_factor",
                    "high_freq_factor",
                    "original_max_position_embeddings",
                )
                if getattr(self, name) is None
            ]
            if missing:
                raise ValueError(f"llama3 rope scaling needs {missing} in rope_scaling")
        return self


class LlamaConfig(BaseModel):
    """Architecture of a Llama/Mistral decoder, parsed from a HF ``config.json``.

    Keys of ``config.json`` this code does not use (``initializer_range``,
    ``use_cache``, ...) are ignored; options that would change the computation and
    are not implemented (other rope scaling types, attention/MLP biases, other
    activations, quantization) are rejected with an error naming them. Both the
    transformers 4 (``rope_theta`` + ``rope_scaling``) and 5 (``rope_parameters``)
    layouts are accepted.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    model_type: Literal["llama", "mistral"] = Field(
        "llama", description="HF model type"
    )
    vocab_size: int = Field(gt=0, description="number of token ids")
    hidden_size: int = Field(gt=0, description="model width D")
    intermediate_size: int = Field(gt=0, description="MLP inner width F")
    num_hidden_layers: int = Field(gt=0, description="number of decoder layers L")
    num_attention_heads: int = Field(gt=0, description="query heads H")
    num_key_value_heads: int = Field(gt=0, description="key/value heads Hkv (GQA)")
    head_dim: int = Field(gt=0, description="per-head width Dh")
    max_position_embeddings: int = Field(2048, gt=0, description="longest sequence")
    rms_norm_eps: float = Field(1e-6, gt=0, description="RMSNorm epsilon")
    rope_theta: float = Field(10000.0, gt=0, description="rotary base")
    rope_scaling: RopeScaling | None = Field(None, description="rotary scaling")
    sliding_window: int | None = Field(
        None, gt=0, description="attend only to this many most recent keys (Mistral)"
    )
    tie_word_embeddings: bool = Field(False, description="LM head shares embeddings")
    hidden_act: Literal["silu"] = Field("silu", description="MLP activation")
    attention_bias: Literal[False] = Field(False, description="biases unsupported")
    mlp_bias: Literal[False] = Field(False, description="biases unsupported")
    bos_token_id: int | None = Field(None, description="begin-of-sequence id")
    eos_token_id: int | list[int] | None = Field(None, description="stop id(s)")
    pad_token_id: int | None = Field(None, description="padding id")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="dtype the weights were saved in"
    )

    @model_validator(mode="before")
    @classmethod
    def _normalise_hf_keys(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        if "torch_dtype" in data:
            data.setdefault("dtype", data.pop("torch_dtype"))
        if data.get("quantization_config"):
            raise ValueError(
                "quantized checkpoints (quantization_config) are not supported; "
                "use an unquantized float16/bfloat16/float32 checkpoint"
            )
        rope = data.pop("rope_parameters", None)
        if rope is not None:
            rope = dict(rope)
            if "rope_theta" in rope:
                data["rope_theta"] = rope.pop("rope_theta")
            data["rope_scaling"] = rope
        data["rope_scaling"] = _parse_rope_scaling(data.get("rope_scaling"))
        heads = data.get("num_attention_heads")
        if data.get("num_key_value_heads") is None:
            data["num_key_value_heads"] = heads
        if data.get("head_dim") is None and heads and data.get("hidden_size"):
            if data["hidden_size"] % heads:
                raise ValueError(
                    f"hidden_size {data['hidden_size']} is not divisible by "
                    f"num_attention_heads {heads}; give head_dim explicitly"
                )
            data["head_dim"] = data["hidden_size"] // heads
        return data

    @model_validator(mode="after")
    def _check_shapes(self) -> LlamaConfig:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} must be a multiple "
                f"of num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary")
        return self

    @classmethod
    def from_hf(cls, source: Mapping[str, Any] | str | Path) -> LlamaConfig:
        """Parse a HF config (a mapping, a ``config.json`` or a checkpoint folder).

        Raises:
            ConfigError: the file is missing or a value is invalid/unsupported.
        """
        data, where = _read_hf_config(source)
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(
                f"{where}: unsupported or invalid model config: {e}"
            ) from e

    def to_hf(self) -> dict[str, Any]:
        """The ``config.json`` mapping for this config (readable by transformers)."""
        data = self.model_dump(exclude={"rope_scaling", "dtype"})
        data["architectures"] = [ARCHITECTURES[self.model_type]]
        if self.rope_scaling is not None:
            data["rope_scaling"] = self.rope_scaling.model_dump(exclude_none=True)
        else:
            data["rope_scaling"] = None
        if self.dtype is not None:
            data["torch_dtype"] = self.dtype
        return data

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The checkpoint's dtype as a torch dtype, if the config names one."""
        return DTYPES[self.dtype] if self.dtype else None

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Token ids that end generation (``eos_token_id``, one or several)."""
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)


def _parse_rope_scaling(scaling: Any) -> Any:
    if not isinstance(scaling, Mapping):
        return scaling
    scaling = dict(scaling)
    kind = scaling.pop("rope_type", None)
    kind = scaling.pop("type", None) or kind
    partial = scaling.pop("partial_rotary_factor", 1.0)
    if partial != 1.0:
        raise ValueError(
            f"partial_rotary_factor {partial} is not supported (only full rotary, 1.0)"
        )
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope scaling type {kind!r} is not implemented; supported types are "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if kind == "default":
        return None
    scaling["rope_type"] = kind
    return scaling


def _read_hf_config(source: Mapping[str, Any] | str | Path) -> tuple[dict, str]:
    import json

    if isinstance(source, Mapping):
        return dict(source), "model config"
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"no model config at {str(path)!r}; a HF checkpoint folder holds config.json"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path} holds a JSON {type(data).__name__}, not an object of model "
            "settings"
        )
    return data, str(path)


def tiny_llama_config(**overrides: Any) -> LlamaConfig:
    """A tiny Llama config over the byte tokenizer, for tests and demos.

    Defaults: 2 layers, width 64, 4 query heads over 2 KV heads (GQA), 512 positions.
    Any `LlamaConfig` field can be overridden.
    """
    fields = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "dtype": "float32",
    }
    unknown = set(overrides) - set(LlamaConfig.model_fields)
    if unknown:
        raise ConfigError(f"unknown LlamaConfig fields {sorted(unknown)}")
    fields.update(overrides)
    return LlamaConfig.model_validate(fields)


# --------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich, 2019), computed in float32."""

    def __init__(self, dim: int, eps: float, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(config: LlamaConfig, device=None) -> Tensor:
    """Rotary inverse frequencies ``(Dh/2,)`` in float32, with the config's scaling.

    llama3 scaling (Llama 3.1) divides the low frequencies by ``factor``, keeps the
    high ones and interpolates smoothly in between; linear divides all of them.
    """
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (config.rope_theta**exponents)  # (Dh/2,)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    old_context = scaling.original_max_position_embeddings
    low_wavelen = old_context / scaling.low_freq_factor
    high_wavelen = old_context / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_context / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    in_band = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(in_band, blended, scaled)


def rotary_cos_sin(
    inv_freq: Tensor, positions: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Cosines and sines ``(B, 1, T, Dh)`` of ``positions (B, T)``."""
    angles = positions.float()[..., None] * inv_freq  # (B, T, Dh/2)
    angles = torch.cat([angles, angles], dim=-1)  # (B, T, Dh)
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x (B, H, T, Dh)`` by position, HF "rotate half" layout."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # (B, H, T, Dh)
    return x * cos + rotated * sin


def attention_mask(
    starts: Sequence[int],
    counts: Sequence[int],
    num_new: int,
    window: int | None,
    *,
    cached: bool,
    device: torch.device | str | None = None,
) -> tuple[Tensor | None, bool]:
    """Which keys each new token may attend to, as ``(mask, is_causal)``.

    Query ``t`` of sequence ``b`` sits at position ``starts[b] + t`` and sees keys
    at positions up to its own (and, with a sliding window, the last ``window``
    of them). Returns no mask where SDPA needs none: a plain causal forward
    (``is_causal``), or a single query that sees every cached key.

    Args:
        starts: cached positions per sequence.
        counts: valid new tokens per sequence; the rest of the T is padding.
        num_new: padded width T.
        window: sliding-window length, or None.
        cached: whether the keys include cached positions (False: positions 0..T-1).
        device: where to build the mask.

    Returns:
        A bool mask ``(B, 1, T, S)`` (True: may attend) or None, and ``is_causal``.
    """
    if not cached and (window is None or window >= num_new):
        return None, num_new > 1
    sees_all = window is None or window > starts[0]
    if cached and len(starts) == 1 and num_new == 1 and sees_all:
        return None, False
    start_t = torch.tensor(starts, device=device)  # (B,)
    count_t = torch.tensor(counts, device=device)  # (B,)
    offsets = torch.arange(num_new, device=device)  # (T,)
    # Padding queries borrow the last valid position so no row is all-masked.
    query_pos = start_t[:, None] + torch.minimum(
        offsets, count_t[:, None] - 1
    )  # (B, T)
    num_keys = max(s + n for s, n in zip(starts, counts, strict=True))
    key_pos = torch.arange(num_keys, device=device)  # (S,)
    allowed = key_pos <= query_pos[..., None]  # (B, T, S)
    if window is not None:
        allowed &= key_pos > query_pos[..., None] - window
    return allowed[:, None], False  # (B, 1, T, S)


@dataclass
class ForwardContext:
    """What every layer of one forward needs besides its hidden state.

    Built once per forward by `Transformer.prepare`.
    """

    cos: Tensor  # (B, 1, T, Dh)
    sin: Tensor  # (B, 1, T, Dh)
    mask: Tensor | None  # (B, 1, T, S) bool, True = may attend; None = see is_causal
    is_causal: bool
    caches: Sequence[KVCache] | None
    starts: list[int]  # cached positions of each sequence before this forward
    num_new: list[int]  # valid new tokens of each sequence (<= T)
    token_mask: Tensor | None  # (B, T) bool, False on right padding; None = all valid
    on_attention: AttentionHook | None = None

    @property
    def num_keys(self) -> int:
        """S: the longest sequence's length after this forward."""
        return max(s + n for s, n in zip(self.starts, self.num_new, strict=True))


class Attention(nn.Module):
    """Grouped-query self-attention with rotary positions and a per-sequence cache."""

    def __init__(self, config: LlamaConfig, layer_idx: int, device=None, dtype=None):
        super().__init__()
        kw = {"bias": False, "device": device, "dtype": dtype}
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        q_dim = self.num_heads * self.head_dim
        kv_dim = self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_dim, **kw)
        self.k_proj = nn.Linear(config.hidden_size, kv_dim, **kw)
        self.v_proj = nn.Linear(config.hidden_size, kv_dim, **kw)
        self.o_proj = nn.Linear(q_dim, config.hidden_size, **kw)

    def forward(self, x: Tensor, ctx: ForwardContext) -> Tensor:
        batch, num_new, _ = x.shape
        q = self.q_proj(x).view(batch, num_new, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, num_new, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, num_new, self.num_kv_heads, self.head_dim)
        q = apply_rotary(q.transpose(1, 2), ctx.cos, ctx.sin)  # (B, H, T, Dh)
        k = apply_rotary(k.transpose(1, 2), ctx.cos, ctx.sin)  # (B, Hkv, T, Dh)
        v = v.transpose(1, 2)  # (B, Hkv, T, Dh)
        if ctx.caches is not None:
            k, v = self._cache_and_gather(k, v, ctx)  # (B, Hkv, S, Dh)
        # Each key/value head serves H / Hkv query heads (no repeated copy).
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=ctx.mask,
            is_causal=ctx.is_causal,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )  # (B, H, T, Dh)
        return self.o_proj(out.transpose(1, 2).reshape(batch, num_new, -1))  # (B, T, D)

    def _cache_and_gather(
        self, k: Tensor, v: Tensor, ctx: ForwardContext
    ) -> tuple[Tensor, Tensor]:
        """Append the new keys to each sequence's cache; return all keys, padded."""
        layer = self.layer_idx
        for b, cache in enumerate(ctx.caches):
            n = ctx.num_new[b]
            cache.write(layer, ctx.starts[b], k[b, :, :n], v[b, :, :n])
        if len(ctx.caches) == 1:
            keys, values = ctx.caches[0].keys_values(layer, ctx.num_keys)
            return keys[None], values[None]  # (1, Hkv, S, Dh)
        shape = (len(ctx.caches), self.num_kv_heads, ctx.num_keys, self.head_dim)
        keys, values = k.new_zeros(shape), v.new_zeros(shape)  # (B, Hkv, S, Dh)
        for b, cache in enumerate(ctx.caches):
            length = ctx.starts[b] + ctx.num_new[b]
            keys[b, :, :length], values[b, :, :length] = cache.keys_values(
                layer, length
            )
        return keys, values


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))`` (Shazeer, 2020)."""

    def __init__(self, config: LlamaConfig, layer_idx: int, device=None, dtype=None):
        super().__init__()
        kw = {"bias": False, "device": device, "dtype": dtype}
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, **kw)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, **kw)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, **kw)

    def forward(self, x: Tensor, token_mask: Tensor | None = None) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (B, T, D)


# Builds a layer's feed-forward block: (config, layer index, device, dtype) -> module
# whose forward is (x (B, T, D), token_mask (B, T) | None) -> (B, T, D).
MLPFactory = Callable[..., nn.Module]


class DecoderLayer(nn.Module):
    """Pre-norm block: ``h = x + attn(norm(x)); out = h + mlp(norm(h))``."""

    def __init__(
        self,
        config: LlamaConfig,
        layer_idx: int,
        mlp: nn.Module,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.layer_idx = layer_idx
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, device, dtype)
        self.self_attn = Attention(config, layer_idx, device, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, device, dtype)
        self.mlp = mlp

    def forward(self, x: Tensor, ctx: ForwardContext) -> Tensor:
        h = x + self.self_attn(self.input_layernorm(x), ctx)  # (B, T, D)
        if ctx.on_attention is not None:
            ctx.on_attention(self.layer_idx, h)
        return h + self.mlp(self.post_attention_layernorm(h), ctx.token_mask)


# --------------------------------------------------------------------------- model


class Transformer(nn.Module):
    """Decoder-only transformer: embeddings, L decoder layers, norm, LM head.

    Subclasses choose the feed-forward block of each layer (`Llama`: SwiGLU MLP;
    `raysys.models.mixtral.Mixtral`: sparse mixture of experts).
    """

    def __init__(
        self,
        config: LlamaConfig,
        mlp_factory: MLPFactory,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(
            config.vocab_size, config.hidden_size, device=device, dtype=dtype
        )
        self.layers = nn.ModuleList(
            DecoderLayer(
                config, i, mlp_factory(config, i, device, dtype), device, dtype
            )
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, device, dtype)
        self.lm_head = None
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(
                config.hidden_size,
                config.vocab_size,
                bias=False,
                device=device,
                dtype=dtype,
            )
        self._inv_freq: dict[torch.device, Tensor] = {}

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the weights."""
        return self.embed_tokens.weight.dtype

    def init_weights(self, std: float = 0.02, seed: int | None = None) -> None:
        """Random init as HF does: normal(0, std) matrices, unit norm weights."""
        generator = torch.Generator(device="cpu")
        if seed is not None:
            generator.manual_seed(seed)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                else:
                    sample = torch.randn(param.shape, generator=generator) * std
                    param.copy_(sample.to(param.dtype))

    def new_cache(self, block_size: int = 64) -> KVCache:
        """An empty cache for one sequence, on this model's device and dtype."""
        c = self.config
        return KVCache(
            c.num_hidden_layers,
            c.num_key_value_heads,
            c.head_dim,
            device=self.device,
            dtype=self.dtype,
            block_size=block_size,
        )

    def import_cache(self, state: KVState, block_size: int = 64) -> KVCache:
        """A cache on this model's device from another instance's `KVCache.export`.

        Raises:
            ValueError: the state's shape does not fit this model's architecture.
        """
        c = self.config
        expected = (c.num_hidden_layers, 2, c.num_key_value_heads, c.head_dim)
        got = tuple(state.kv.shape[:3]) + (state.kv.shape[4],)
        if state.kv.dim() != 5 or got != expected:
            raise ValueError(
                f"KV state of shape {tuple(state.kv.shape)} does not fit this model; "
                f"expected (L, 2, Hkv, S, Dh) with (L, 2, Hkv, Dh) = {expected}"
            )
        return KVCache.from_state(
            state, device=self.device, dtype=self.dtype, block_size=block_size
        )

    def prepare(
        self,
        tokens: Tensor,
        caches: Sequence[KVCache] | None = None,
        num_new_tokens: Sequence[int] | None = None,
        on_attention: AttentionHook | None = None,
    ) -> ForwardContext:
        """Positions, rotary tables and attention mask for one forward.

        Reserves room in each cache for its new tokens; positions are counted from
        each cache's length.
        """
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise ValueError(
                f"tokens must be (B, T) with T >= 1, got shape {tuple(tokens.shape)}; "
                "add a batch dimension with tokens[None]"
            )
        batch, num_new = tokens.shape
        device = tokens.device
        if caches is None:
            if num_new_tokens is not None:
                raise ValueError("num_new_tokens needs caches (one per sequence)")
            starts, counts = [0] * batch, [num_new] * batch
        else:
            if len(caches) != batch:
                raise ValueError(f"{len(caches)} caches given for a batch of {batch}")
            starts = [cache.num_tokens for cache in caches]
            counts = (
                list(num_new_tokens)
                if num_new_tokens is not None
                else [num_new] * batch
            )
            if len(counts) != batch or not all(1 <= n <= num_new for n in counts):
                raise ValueError(
                    f"num_new_tokens {counts} must give, for each of the {batch} "
                    f"sequences, a count in [1, {num_new}] (the padded token width)"
                )
        longest = max(s + n for s, n in zip(starts, counts, strict=True))
        if longest > self.config.max_position_embeddings:
            raise ValueError(
                f"a sequence would reach {longest} positions, beyond the model's "
                f"max_position_embeddings {self.config.max_position_embeddings}; "
                "clip the prompt or the generation length"
            )
        if caches is not None:
            for cache, start, n in zip(caches, starts, counts, strict=True):
                cache.reserve(start + n)

        offsets = torch.arange(num_new, device=device)  # (T,)
        start_t = torch.tensor(starts, device=device)  # (B,)
        count_t = torch.tensor(counts, device=device)  # (B,)
        positions = start_t[:, None] + offsets  # (B, T)
        if device not in self._inv_freq:
            self._inv_freq[device] = rope_inv_freq(self.config, device)
        cos, sin = rotary_cos_sin(self._inv_freq[device], positions, self.dtype)

        padded = any(n < num_new for n in counts)
        token_mask = offsets[None, :] < count_t[:, None] if padded else None  # (B, T)
        mask, is_causal = attention_mask(
            starts,
            counts,
            num_new,
            self.config.sliding_window,
            cached=caches is not None,
            device=device,
        )
        return ForwardContext(
            cos=cos,
            sin=sin,
            mask=mask,
            is_causal=is_causal,
            caches=caches,
            starts=starts,
            num_new=counts,
            token_mask=token_mask,
            on_attention=on_attention,
        )

    def commit(self, ctx: ForwardContext) -> None:
        """Count the new tokens of a finished forward as cached.

        `forward` is ``prepare``, ``embed_tokens``, each of ``layers``, ``commit``
        and ``head``; callers that run the layers one by one do the same steps.
        """
        if ctx.caches is not None:
            for cache, n in zip(ctx.caches, ctx.num_new, strict=True):
                cache.num_tokens += n

    def head(self, h: Tensor) -> Tensor:
        """Final norm and LM head: hidden ``(..., D)`` -> logits ``(..., V)``."""
        h = self.norm(h)
        if self.lm_head is None:
            return F.linear(h, self.embed_tokens.weight)
        return self.lm_head(h)

    def forward(
        self,
        tokens: Tensor,
        caches: Sequence[KVCache] | None = None,
        num_new_tokens: Sequence[int] | None = None,
        *,
        last_only: bool = False,
        on_attention: AttentionHook | None = None,
    ) -> Tensor:
        """Logits for ``tokens (B, T)``.

        Args:
            tokens: new token ids, right-padded to a common width T when sequences
                bring different numbers of new tokens.
            caches: one `KVCache` per sequence; the new tokens continue each cache
                and are appended to it. None: a plain causal forward from position 0.
            num_new_tokens: valid tokens per sequence (default: all T).
            last_only: return only each sequence's last valid position, ``(B, V)``.
            on_attention: called per layer with ``(layer_idx, h)``, where ``h
                (B, T, D)`` is the residual stream after attention, the input of
                the layer's post-attention norm and MLP/MoE block.

        Returns:
            Logits ``(B, T, V)`` (padding rows hold garbage), or ``(B, V)``.
        """
        ctx = self.prepare(tokens, caches, num_new_tokens, on_attention)
        h = self.embed_tokens(tokens)  # (B, T, D)
        for layer in self.layers:
            h = layer(h, ctx)  # (B, T, D)
        self.commit(ctx)
        if last_only:
            rows = torch.arange(h.shape[0], device=h.device)
            last = torch.tensor(ctx.num_new, device=h.device) - 1
            h = h[rows, last]  # (B, D)
        return self.head(h)


def _dense_mlp(config: LlamaConfig, layer_idx: int, device=None, dtype=None) -> MLP:
    return MLP(config, layer_idx, device, dtype)


class Llama(Transformer):
    """The dense Llama/Mistral decoder."""

    def __init__(
        self,
        config: LlamaConfig,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(config, _dense_mlp, device=device, dtype=dtype)


# --------------------------------------------------------------------------- phases


@torch.no_grad()
def prefill(
    model: Transformer, tokens: Tensor, cache: KVCache, chunk_size: int | None = None
) -> Tensor:
    """Append a prompt ``tokens (T,)`` to ``cache``, in chunks of ``chunk_size``.

    Returns:
        Logits ``(V,)`` of the last prompt token.
    """
    if tokens.dim() != 1 or tokens.numel() == 0:
        raise ValueError(
            f"prefill takes a non-empty 1-D prompt, got shape {tuple(tokens.shape)}"
        )
    step = chunk_size or tokens.numel()
    if step <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    for begin in range(0, tokens.numel(), step):
        chunk = tokens[begin : begin + step]
        logits = model(chunk[None], [cache], last_only=True)  # (1, V)
    return logits[0]


@torch.no_grad()
def decode_step(
    model: Transformer, tokens: Tensor, caches: Sequence[KVCache]
) -> Tensor:
    """One decode step of B sequences at their own positions: ``tokens (B,)`` -> ``(B, V)``."""
    return model(tokens[:, None], caches, last_only=True)


@torch.no_grad()
def greedy_generate(
    model: Transformer,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    stop_ids: Sequence[int] | None = None,
    chunk_size: int | None = None,
) -> list[int]:
    """Greedy continuation of ``prompt``: at most ``max_new_tokens`` ids.

    Generation ends after the first id in ``stop_ids`` (default: the config's
    ``eos_token_id``), which is included in the result.
    """
    stop = set(model.config.stop_token_ids if stop_ids is None else stop_ids)
    cache = model.new_cache()
    logits = prefill(
        model, torch.tensor(prompt, device=model.device), cache, chunk_size
    )
    out: list[int] = []
    while len(out) < max_new_tokens:
        token = int(logits.argmax())
        out.append(token)
        if token in stop or len(out) == max_new_tokens:
            break
        next_token = torch.tensor([token], device=model.device)
        logits = decode_step(model, next_token, [cache])[0]
    return out
