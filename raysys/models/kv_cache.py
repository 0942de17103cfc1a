"""Per-sequence KV cache of the decoder in `raysys.models.llama`.

One `KVCache` per sequence holds the keys and values of every layer for that
sequence's tokens so far, so sequences of different lengths live side by side and
a serving engine admits and retires them one at a time (continuous batching). A
forward appends each sequence's new tokens at its own positions (see
`raysys.models.llama.Transformer.forward`). `KVCache.truncate` drops positions
(rejected speculative tokens); `KVCache.export` copies the valid positions into a
`KVState` of plain CPU tensors that travels through the Ray object store and
becomes a cache again on another instance with
`raysys.models.llama.Transformer.import_cache`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class KVState:
    """A sequence's cache as plain CPU tensors, for handoff to another instance.

    Attributes:
        kv: keys and values, ``(L, 2, Hkv, S, Dh)``; index 0 of dim 1 holds keys.
    """

    kv: Tensor  # (L, 2, Hkv, S, Dh)

    @property
    def num_tokens(self) -> int:
        """Cached positions S."""
        return self.kv.shape[3]

    @property
    def nbytes(self) -> int:
        """Size of the tensors in bytes."""
        return self.kv.numel() * self.kv.element_size()


class KVCache:
    """Keys and values of every layer for one sequence's tokens so far.

    Storage is one tensor ``(L, 2, Hkv, capacity, Dh)`` that grows (doubling, in
    multiples of ``block_size`` positions) as tokens are appended; ``num_tokens``
    positions are valid. Writes hold no autograd history: caches are for inference.
    """

    # TODO: a batched forward copies every sequence's keys into one padded tensor
    # per layer; a paged cache with a gather-free attention kernel would avoid that
    # copy, which grows with batch size times context length.

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        block_size: int = 64,
    ) -> None:
        self.block_size = block_size
        self.num_tokens = 0
        self.kv = torch.zeros(  # (L, 2, Hkv, capacity, Dh)
            num_layers,
            2,
            num_kv_heads,
            block_size,
            head_dim,
            device=device,
            dtype=dtype,
        )

    @property
    def capacity(self) -> int:
        """Positions allocated."""
        return self.kv.shape[3]

    def reserve(self, num_tokens: int) -> None:
        """Make room for ``num_tokens`` positions in total (no-op if there is room)."""
        if num_tokens <= self.capacity:
            return
        new_capacity = max(2 * self.capacity, num_tokens)
        new_capacity = math.ceil(new_capacity / self.block_size) * self.block_size
        kv = self.kv.new_zeros(*self.kv.shape[:3], new_capacity, self.kv.shape[4])
        kv[:, :, :, : self.num_tokens] = self.kv[:, :, :, : self.num_tokens]
        self.kv = kv

    def write(self, layer: int, start: int, k: Tensor, v: Tensor) -> None:
        """Store keys/values ``(Hkv, n, Dh)`` of positions ``start .. start+n-1``."""
        end = start + k.shape[1]
        self.kv[layer, 0, :, start:end] = k.detach()
        self.kv[layer, 1, :, start:end] = v.detach()

    def keys_values(self, layer: int, num_tokens: int) -> tuple[Tensor, Tensor]:
        """Views of the first ``num_tokens`` keys and values, ``(Hkv, S, Dh)`` each."""
        return self.kv[layer, 0, :, :num_tokens], self.kv[layer, 1, :, :num_tokens]

    def truncate(self, num_tokens: int) -> None:
        """Forget every position from ``num_tokens`` on (rejected draft tokens).

        Raises:
            ValueError: ``num_tokens`` is negative or beyond what is cached.
        """
        if not 0 <= num_tokens <= self.num_tokens:
            raise ValueError(
                f"cannot truncate a cache of {self.num_tokens} tokens to {num_tokens}; "
                f"pass a length in [0, {self.num_tokens}]"
            )
        self.num_tokens = num_tokens

    def clone(self) -> KVCache:
        """An independent copy (same device and dtype)."""
        copy = KVCache.__new__(KVCache)
        copy.block_size = self.block_size
        copy.num_tokens = self.num_tokens
        copy.kv = self.kv.clone()
        return copy

    def export(self) -> KVState:
        """The valid positions as a contiguous CPU tensor (safe to send through Ray)."""
        kv = self.kv[:, :, :, : self.num_tokens]  # (L, 2, Hkv, S, Dh)
        return KVState(kv=kv.to("cpu", copy=True).contiguous())

    @classmethod
    def from_state(
        cls,
        state: KVState,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        block_size: int = 64,
    ) -> KVCache:
        """A cache holding ``state``'s positions on ``device`` (see `Transformer.import_cache`)."""
        num_layers, _, num_kv_heads, num_tokens, head_dim = state.kv.shape
        cache = cls(
            num_layers,
            num_kv_heads,
            head_dim,
            device=device,
            dtype=dtype or state.kv.dtype,
            block_size=block_size,
        )
        cache.reserve(num_tokens)
        cache.kv[:, :, :, :num_tokens] = state.kv
        cache.num_tokens = num_tokens
        return cache

    @property
    def nbytes(self) -> int:
        """Bytes of the valid positions."""
        per_token = self.kv[:, :, :, :1].numel() * self.kv.element_size()
        return per_token * self.num_tokens
