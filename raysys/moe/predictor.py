"""SP-MoE's cross-model expert predictor.

While the dense draft drafts, each of its layers hands its attention output
(the residual stream after attention, the input of the layer's MLP) to the
target's router of the same layer, through the target's post-attention norm
(as `raysys.models.mixtral.Mixtral.route` does), with no learned projection:
the draft and the target share hidden size and layer structure. The top-k
experts of those scores, over the tokens of the coming verification pass, are
the prediction; for layers below the cutoff they are handed to the fetcher at
once, while the draft goes on to its next layer.

The prediction runs inside every draft step, so it is kept to one matrix
product and a sort of E scores per token, in numpy: RMSNorm multiplies a
token by a positive scalar and then by the norm weight, and a positive scalar
does not change which router logits are largest, so the norm weight is folded
into the router once (``W_e * g``) and the scalar is skipped. The ranking is
the router's own.

Accuracy is scored per pass and layer against the experts the target's
verification actually routed to: precision and recall of the predicted *set*
(what prefetching needs), plus per-token top-1 accuracy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from raysys.models.mixtral import Mixtral, Routing

logger = logging.getLogger(__name__)

# Receives (layer, expert ids) predicted for the coming pass.
OnPredict = Callable[[int, Sequence[int]], object]


@dataclass
class LayerScore:
    """Sums over verification passes of one layer."""

    num_passes: int = 0
    num_predicted: int = 0  # |P| summed
    num_actual: int = 0  # |A| summed
    num_overlap: int = 0  # |P & A| summed
    num_tokens: int = 0
    num_top1: int = 0  # tokens whose predicted top-1 is the routed top-1


@dataclass
class PredictionScore:
    """Accuracy of the predictor, per layer."""

    layers: list[LayerScore] = field(default_factory=list)

    def _sum(self, name: str, layers: Sequence[int] | None) -> int:
        chosen = range(len(self.layers)) if layers is None else layers
        return sum(getattr(self.layers[i], name) for i in chosen)

    def precision(self, layers: Sequence[int] | None = None) -> float | None:
        """Predicted experts that the pass routed to; None without predictions."""
        predicted = self._sum("num_predicted", layers)
        return self._sum("num_overlap", layers) / predicted if predicted else None

    def recall(self, layers: Sequence[int] | None = None) -> float | None:
        """Routed experts that were predicted; None without passes."""
        actual = self._sum("num_actual", layers)
        return self._sum("num_overlap", layers) / actual if actual else None

    def top1(self, layers: Sequence[int] | None = None) -> float | None:
        """Tokens whose top-1 expert was predicted exactly."""
        tokens = self._sum("num_tokens", layers)
        return self._sum("num_top1", layers) / tokens if tokens else None

    def per_layer(self, metric: str) -> list[float | None]:
        """``metric`` ("precision", "recall", "top1") of each layer."""
        return [getattr(self, metric)([i]) for i in range(len(self.layers))]


class ExpertPredictor:
    """Scores draft attention outputs with the target's routers.

    Args:
        target: the MoE target (its routers and post-attention norms are used).
        prefetch_layers: layers ``0 .. prefetch_layers - 1`` hand their
            predictions to ``on_predict`` (the cutoff).
        on_predict: called with (layer, expert ids) as predictions arrive.
        measure_all: predict every layer (for scoring), not only those below
            the cutoff.
    """

    def __init__(
        self,
        target: Mixtral,
        *,
        prefetch_layers: int,
        on_predict: OnPredict | None = None,
        measure_all: bool = True,
    ) -> None:
        self.target = target
        self.num_layers = target.config.num_hidden_layers
        self.prefetch_layers = prefetch_layers
        self.on_predict = on_predict
        self.measure_all = measure_all
        self.score = PredictionScore([LayerScore() for _ in range(self.num_layers)])
        self.top_k = target.config.num_experts_per_tok
        # (D, E), float32 on the host: the scores of a few rows are a matrix
        # product of microseconds, which numpy does with less overhead per call
        # than torch.
        self.folded = [
            (layer.mlp.gate.weight * layer.post_attention_layernorm.weight)
            .detach()
            .to("cpu", torch.float32)
            .T.contiguous()
            .numpy()
            for layer in target.layers
        ]
        self.skip_rows = 0  # leading rows of the next draft forward to ignore
        self._rows: list[list[Tensor]] = [[] for _ in range(self.num_layers)]

    def begin_round(self) -> None:
        """Forget the predictions of the last round."""
        self._rows = [[] for _ in range(self.num_layers)]

    def observe(self, layer_idx: int, hidden: Tensor) -> None:
        """The draft's attention hook: ``hidden (1, T, D)`` after layer attention."""
        if layer_idx >= self.prefetch_layers and not self.measure_all:
            return
        rows = hidden[0, self.skip_rows :]  # (t, D)
        if rows.shape[0] == 0:
            return
        scores = rows.detach().to("cpu", torch.float32).numpy() @ self.folded[layer_idx]
        top = np.argsort(-scores, axis=-1, kind="stable")[:, : self.top_k]  # (t, k)
        self._rows[layer_idx].append(torch.from_numpy(top))
        if layer_idx < self.prefetch_layers and self.on_predict is not None:
            self.on_predict(layer_idx, sorted(set(top.ravel().tolist())))

    def predicted(self, layer_idx: int) -> Tensor:
        """This round's predicted top-k per token ``(t, k)`` of a layer."""
        rows = self._rows[layer_idx]
        if not rows:
            return torch.empty(
                0, self.target.config.num_experts_per_tok, dtype=torch.long
            )
        return torch.cat(rows)

    def score_round(self, routings: Sequence[Routing | None]) -> None:
        """Compare this round's predictions with the verification's routing."""
        for layer_idx, routing in enumerate(routings):
            predicted = self.predicted(layer_idx)
            if routing is None or predicted.shape[0] == 0:
                continue
            actual = routing.expert_ids  # (N, k)
            s = self.score.layers[layer_idx]
            p_set = set(predicted.unique().tolist())
            a_set = set(actual.unique().tolist())
            s.num_passes += 1
            s.num_predicted += len(p_set)
            s.num_actual += len(a_set)
            s.num_overlap += len(p_set & a_set)
            n = min(predicted.shape[0], actual.shape[0])
            s.num_tokens += n
            s.num_top1 += int((predicted[:n, 0] == actual[:n, 0]).sum())
