"""Mixtral: the Llama decoder with a sparse mixture-of-experts feed-forward block.

Attention, norms, rotary embeddings and the KV cache are `raysys.models.llama`'s;
only each layer's feed-forward block differs (Jiang et al., "Mixtral of Experts",
2024). A router (``gate``, a linear map D -> E) scores every token, the top k of the
softmaxed scores pick k experts, their weights are renormalised to sum to one,
and the token's output is the weighted sum of those experts' SwiGLU outputs,
exactly as the HF implementation routes.

Expert weights reach the block through an `ExpertSource`: by default the block's
own resident experts; alternatively any object that returns the weights of the
experts a layer needs (an `ExpertStore` in host memory, or an engine's cache in
front of remote expert hosts). A block asks for all the experts one forward needs
in a layer in one call, so a bounded cache need only hold one layer's experts.
Every block records its routing (`Routing`) of the last forward, and
`Mixtral.route` scores any hidden state with a layer's router (a draft model's
attention outputs, for expert prediction).

Shape letters: N routed tokens, D hidden size, F expert inner size, E experts,
k experts per token; B, T as in `raysys.models.llama`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from raysys.models.llama import Llama, LlamaConfig, Transformer, tiny_llama_config
from raysys.runtime.errors import ConfigError

logger = logging.getLogger(__name__)


class MixtralConfig(LlamaConfig):
    """A Mixtral config: `LlamaConfig` plus the expert count and top-k."""

    model_type: Literal["mixtral"] = Field("mixtral", description="HF model type")
    num_local_experts: int = Field(gt=0, description="experts per layer E")
    num_experts_per_tok: int = Field(gt=0, description="experts per token k")
    router_jitter_noise: float = Field(
        0.0, ge=0, description="training-time router noise; unused at inference"
    )

    @model_validator(mode="after")
    def _check_top_k(self) -> MixtralConfig:
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError(
                f"num_experts_per_tok {self.num_experts_per_tok} exceeds "
                f"num_local_experts {self.num_local_experts}"
            )
        return self


def tiny_mixtral_config(**overrides: Any) -> MixtralConfig:
    """A tiny Mixtral config (`tiny_llama_config` defaults, 4 experts, top-2)."""
    fields = tiny_llama_config().model_dump(exclude={"model_type"})
    fields.update(num_local_experts=4, num_experts_per_tok=2)
    unknown = set(overrides) - set(MixtralConfig.model_fields)
    if unknown:
        raise ConfigError(f"unknown MixtralConfig fields {sorted(unknown)}")
    fields.update(overrides)
    return MixtralConfig.model_validate(fields)


class ExpertWeights(NamedTuple):
    """One expert's SwiGLU weights, HF Mixtral layout (``out = w2(silu(w1 x) * w3 x)``)."""

    w1: Tensor  # (F, D) gate
    w2: Tensor  # (D, F) down
    w3: Tensor  # (F, D) up

    @property
    def nbytes(self) -> int:
        """Bytes of the three matrices."""
        return sum(t.numel() * t.element_size() for t in self)

    def to(
        self,
        device: torch.device | str,
        dtype: torch.dtype | None = None,
        *,
        copy: bool = False,
    ) -> ExpertWeights:
        """The weights on ``device`` (no copy when already there unless ``copy``)."""
        return ExpertWeights(*(t.detach().to(device, dtype, copy=copy) for t in self))


def expert_forward(weights: ExpertWeights, x: Tensor) -> Tensor:
    """One expert on tokens ``x (N, D)`` -> ``(N, D)``."""
    return F.linear(
        F.silu(F.linear(x, weights.w1)) * F.linear(x, weights.w3), weights.w2
    )


@runtime_checkable
class ExpertSource(Protocol):
    """Where a MoE block gets expert weights.

    ``get_experts`` is called once per layer per forward with the sorted ids of
    every expert that layer's tokens were routed to, and must return the weights
    of each (on any device; the block moves them to its own device and dtype).
    It may block until remote weights arrive.
    """

    def get_experts(
        self, layer_idx: int, expert_ids: Sequence[int]
    ) -> Mapping[int, ExpertWeights]: ...


class ExpertStore:
    """An `ExpertSource` holding every expert in a dict, e.g. in host memory."""

    def __init__(self, experts: Mapping[tuple[int, int], ExpertWeights]) -> None:
        self.experts = dict(experts)

    @classmethod
    def from_model(
        cls, model: Mixtral, device: torch.device | str = "cpu"
    ) -> ExpertStore:
        """Copies of a model's resident experts on ``device``."""
        c = model.config
        return cls(
            {
                (layer, e): model.expert_weights(layer, e).to(device, copy=True)
                for layer in range(c.num_hidden_layers)
                for e in range(c.num_local_experts)
            }
        )

    def get_experts(
        self, layer_idx: int, expert_ids: Sequence[int]
    ) -> Mapping[int, ExpertWeights]:
        return {e: self.experts[(layer_idx, e)] for e in expert_ids}


@dataclass(frozen=True)
class Routing:
    """A layer's routing decision for N tokens.

    Attributes:
        router_logits: raw router scores ``(N, E)``, model dtype.
        expert_ids: chosen experts per token ``(N, k)``, by descending weight.
        weights: renormalised weights of the chosen experts ``(N, k)``, float32.
    """

    router_logits: Tensor  # (N, E)
    expert_ids: Tensor  # (N, k)
    weights: Tensor  # (N, k)


def route(gate_weight: Tensor, x: Tensor, top_k: int) -> Routing:
    """Route tokens ``x (N, D)``: softmax of the router logits, top-k, renormalise."""
    logits = F.linear(x, gate_weight)  # (N, E)
    probs = torch.softmax(logits.float(), dim=-1)  # (N, E)
    top_probs, top_ids = torch.topk(probs, top_k, dim=-1)  # (N, k)
    return Routing(logits, top_ids, top_probs / top_probs.sum(dim=-1, keepdim=True))


class Expert(nn.Module):
    """One resident expert; parameter names as in HF Mixtral."""

    def __init__(self, config: MixtralConfig, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"bias": False, "device": device, "dtype": dtype}
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, **kw)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, **kw)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, **kw)

    def weights(self) -> ExpertWeights:
        return ExpertWeights(self.w1.weight, self.w2.weight, self.w3.weight)


class SparseMoE(nn.Module):
    """Router + top-k experts, the feed-forward block of a Mixtral layer."""

    def __init__(
        self,
        config: MixtralConfig,
        layer_idx: int,
        device=None,
        dtype=None,
        *,
        resident_experts: bool = True,
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(
            config.hidden_size,
            config.num_local_experts,
            bias=False,
            device=device,
            dtype=dtype,
        )
        num_resident = config.num_local_experts if resident_experts else 0
        self.experts = nn.ModuleList(
            Expert(config, device, dtype) for _ in range(num_resident)
        )
        # Kept out of nn.Module's registry: a source is not part of this block's state.
        self.__dict__["source"] = None
        self.last_routing: Routing | None = None

    def set_source(self, source: ExpertSource | None) -> None:
        """Serve experts from ``source``; None: from this block's resident experts."""
        if source is None and not self.experts:
            raise ValueError(
                f"layer {self.layer_idx} has no resident experts; give a source"
            )
        self.__dict__["source"] = source

    def fetch(self, expert_ids: Sequence[int]) -> Mapping[int, ExpertWeights]:
        """Weights of ``expert_ids`` from the source (or the resident experts)."""
        if self.source is None:
            if not self.experts:
                raise RuntimeError(
                    f"layer {self.layer_idx} has no resident experts and no ExpertSource; "
                    "call Mixtral.set_expert_source first"
                )
            return {e: self.experts[e].weights() for e in expert_ids}
        found = self.source.get_experts(self.layer_idx, expert_ids)
        missing = [e for e in expert_ids if e not in found]
        if missing:
            raise RuntimeError(
                f"expert source {type(self.source).__name__} returned no weights for "
                f"layer {self.layer_idx} experts {missing}"
            )
        return found

    def forward(self, x: Tensor, token_mask: Tensor | None = None) -> Tensor:
        batch, num_new, dim = x.shape
        flat = x.reshape(-1, dim)  # (B*T, D)
        rows = None
        if token_mask is not None:
            rows = token_mask.reshape(-1).nonzero().squeeze(1)  # (N,)
            flat = flat[rows]  # (N, D): padding is neither routed nor fetched
        routing = route(self.gate.weight, flat, self.top_k)
        self.last_routing = routing
        needed = routing.expert_ids.unique().tolist()  # sorted
        weights = self.fetch(needed)

        out = torch.zeros_like(flat)  # (N, D)
        for e in needed:
            token_idx, slot = torch.where(routing.expert_ids == e)  # (n,), (n,)
            w = weights[e].to(flat.device, flat.dtype)
            y = expert_forward(w, flat[token_idx])  # (n, D)
            y = y * routing.weights[token_idx, slot, None]  # float32
            out.index_add_(0, token_idx, y.to(out.dtype))
        if rows is None:
            return out.view(batch, num_new, dim)
        full = x.new_zeros(batch * num_new, dim)  # (B*T, D)
        full[rows] = out
        return full.view(batch, num_new, dim)


class Mixtral(Transformer):
    """The Mixtral decoder: Llama layers whose MLP is a `SparseMoE`.

    Args:
        config: the architecture.
        device, dtype: where and in which dtype the weights are created.
        resident_experts: hold every expert's weights as parameters (False: the
            model holds attention, norms, routers and embeddings only, and its
            experts come from `set_expert_source`).
    """

    def __init__(
        self,
        config: MixtralConfig,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        resident_experts: bool = True,
    ) -> None:
        def moe(cfg: MixtralConfig, layer_idx: int, dev, dt) -> SparseMoE:
            return SparseMoE(cfg, layer_idx, dev, dt, resident_experts=resident_experts)

        super().__init__(config, moe, device=device, dtype=dtype)
        self.has_resident_experts = resident_experts

    @property
    def moe_blocks(self) -> list[SparseMoE]:
        """Each layer's MoE block."""
        return [layer.mlp for layer in self.layers]

    def set_expert_source(self, source: ExpertSource | None) -> None:
        """Serve every layer's experts from ``source`` (None: resident experts)."""
        for block in self.moe_blocks:
            block.set_source(source)

    def expert_weights(self, layer_idx: int, expert_id: int) -> ExpertWeights:
        """A resident expert's weights (views of the parameters)."""
        return self.moe_blocks[layer_idx].experts[expert_id].weights()

    @property
    def expert_nbytes(self) -> int:
        """Bytes of one expert at this model's dtype."""
        c = self.config
        return (
            3
            * c.hidden_size
            * c.intermediate_size
            * self.embed_tokens.weight.element_size()
        )

    def last_routing(self) -> list[Routing | None]:
        """Every layer's routing of the last forward (valid tokens, row-major)."""
        return [block.last_routing for block in self.moe_blocks]

    def route(
        self, layer_idx: int, hidden: Tensor, *, normalize: bool = True
    ) -> Routing:
        """Score ``hidden (..., D)`` with layer ``layer_idx``'s router.

        With ``normalize`` the layer's post-attention RMSNorm is applied first,
        as the layer does to its own attention output before routing; so the
        attention output of a structurally matched draft model (see
        `Transformer.forward`'s ``on_attention``) predicts this layer's experts.
        """
        layer = self.layers[layer_idx]
        x = layer.post_attention_layernorm(hidden) if normalize else hidden
        x = x.reshape(-1, x.shape[-1]).to(self.dtype)  # (N, D)
        return route(layer.mlp.gate.weight, x, self.config.num_experts_per_tok)


@torch.no_grad()
def upcycle(
    dense: Llama,
    num_experts: int,
    top_k: int = 2,
    *,
    router_std: float = 0.02,
    seed: int = 0,
) -> Mixtral:
    """Sparse upcycling (Komatsuzaki et al., 2023): a dense model becomes a MoE.

    Every layer's MLP is copied into ``num_experts`` identical experts and a router
    with small normal(0, ``router_std``) weights is added; all other weights are
    copied. Since the routing weights of a token sum to one, the upcycled model
    computes the dense model's function until it is trained further.
    """
    fields = dense.config.model_dump(exclude={"model_type"})
    config = MixtralConfig.model_validate(
        fields | {"num_local_experts": num_experts, "num_experts_per_tok": top_k}
    )
    moe = Mixtral(config, device=dense.device, dtype=dense.dtype)
    state = {}
    for name, tensor in dense.state_dict().items():
        if ".mlp." not in name:
            state[name] = tensor.clone()
            continue
        prefix, proj = name.split(".mlp.")
        expert_name = {
            "gate_proj.weight": "w1",
            "down_proj.weight": "w2",
            "up_proj.weight": "w3",
        }
        for e in range(num_experts):
            state[f"{prefix}.mlp.experts.{e}.{expert_name[proj]}.weight"] = (
                tensor.clone()
            )
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for i in range(config.num_hidden_layers):
        router = (
            torch.randn(num_experts, config.hidden_size, generator=generator)
            * router_std
        )
        state[f"layers.{i}.mlp.gate.weight"] = router.to(dense.device, dense.dtype)
    moe.load_state_dict(state, strict=True)
    logger.info(
        "upcycled a %d-layer dense model into %d experts (top-%d) per layer",
        config.num_hidden_layers,
        num_experts,
        top_k,
    )
    return moe.eval()
