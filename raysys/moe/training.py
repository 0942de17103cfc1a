"""Train the matched draft/target pair: a dense Llama, upcycled into a Mixtral.

The corpus is the Python standard library's source files of the running
interpreter (present offline everywhere Python is), read with the byte-level
tokenizer, with each line's leading indentation written as one tab per four
spaces (`indent_with_tabs`): a model this small cannot count a dozen spaces and
falls into endless runs of them under greedy decoding, while it handles one
token per indentation level well. Steps:

1. train a tiny dense Llama on the corpus (this is the draft);
2. sparse-upcycle it (Komatsuzaki et al., 2023): every MLP becomes E copies plus
   a router;
3. train the upcycled MoE further (this is the target) with the Switch
   Transformer load-balancing loss (Fedus et al., 2022) so every expert keeps
   receiving tokens and the experts specialise. Attention, norms and embeddings
   stay frozen in this phase, so the draft's attention outputs stay close to the
   target's and the target's routers can score them (the structural match the
   expert predictor relies on);
4. distil the target into the dense model's MLPs (the final draft): its MLPs
   learn to match the target's next-token distribution (Hinton et al., 2015),
   which raises how often drafts are accepted, while its attention, norms and
   embeddings stay the ones it shares with the target, so the residual streams
   of the two models stay aligned layer by layer.
"""

from __future__ import annotations

import logging
import math
import sysconfig
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from raysys.models.llama import Transformer
from raysys.models.mixtral import Mixtral
from raysys.models.tokenizer import BOS_ID, EOS_ID, ByteTokenizer
from raysys.runtime.errors import ConfigError

logger = logging.getLogger(__name__)

# Top-level stdlib packages left out of the corpus: the regression test suite and
# GUI demos are large and unlike ordinary library code.
EXCLUDED_PACKAGES = ("test", "idlelib", "tkinter", "turtledemo", "lib2to3")


def stdlib_root() -> Path:
    """The running interpreter's standard library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(root: str | Path | None = None) -> list[Path]:
    """The ``.py`` files of the corpus under ``root`` (default: the stdlib), sorted.

    Raises:
        ConfigError: ``root`` holds no Python files.
    """
    root = Path(root) if root is not None else stdlib_root()
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if "site-packages" in parts or "tests" in parts:
            continue
        if parts[0] in EXCLUDED_PACKAGES:
            continue
        files.append(path)
    if not files:
        raise ConfigError(
            f"no .py files under {str(root)!r}; pass a folder of Python sources"
        )
    return files


def indent_with_tabs(text: str, width: int = 4) -> str:
    """Each line's leading spaces as one tab per ``width`` (the rest kept)."""
    lines = []
    for line in text.split("\n"):
        stripped = line.lstrip(" ")
        levels, rest = divmod(len(line) - len(stripped), width)
        lines.append("\t" * levels + " " * rest + stripped)
    return "\n".join(lines)


@dataclass
class Corpus:
    """Token ids of the training and validation files, one flat tensor each.

    Each file is framed by BOS and EOS. Every ``valid_every``-th file (in sorted
    order) is held out for validation.
    """

    train: Tensor  # (N_train,) int64
    valid: Tensor  # (N_valid,) int64
    num_files: int

    @classmethod
    def build(cls, files: Sequence[Path], valid_every: int = 20) -> Corpus:
        tokenizer = ByteTokenizer()
        train: list[int] = []
        valid: list[int] = []
        for i, path in enumerate(files):
            text = indent_with_tabs(path.read_text(encoding="utf-8", errors="replace"))
            ids = tokenizer.encode(text, add_bos=True, add_eos=True)
            (valid if i % valid_every == 0 else train).extend(ids)
        return cls(
            torch.tensor(train, dtype=torch.int64),
            torch.tensor(valid, dtype=torch.int64),
            len(files),
        )


def check_corpus(corpus: Corpus, seq_len: int, valid_every: int = 20) -> None:
    """Both splits are long enough for windows of ``seq_len`` (checked up front).

    Raises:
        ConfigError: a split holds no more than ``seq_len + 1`` tokens; the
            message names the split, since with few files every one may have
            gone to the other (file 0, 20, 40, .. are held out for validation).
    """
    num_valid = (corpus.num_files + valid_every - 1) // valid_every
    splits = (
        ("training", corpus.train, corpus.num_files - num_valid),
        ("validation", corpus.valid, num_valid),
    )
    for name, data, num_files in splits:
        if data.numel() <= seq_len + 1:
            raise ConfigError(
                f"the {name} split holds {data.numel()} tokens ({num_files} of "
                f"{corpus.num_files} files; every {valid_every}th file, from the "
                f"first, is held out for validation), not more than seq_len "
                f"{seq_len} + 1; give more or longer files or a smaller seq_len"
            )


def batches(
    data: Tensor, batch_size: int, seq_len: int, seed: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """Random windows of ``data``: inputs ``(B, T)`` and next-token targets ``(B, T)``."""
    if data.numel() <= seq_len + 1:
        raise ConfigError(
            f"corpus of {data.numel()} tokens is shorter than seq_len {seq_len}"
        )
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seq_len + 1)
    while True:
        starts = torch.randint(
            0, data.numel() - seq_len - 1, (batch_size,), generator=generator
        )
        window = data[starts[:, None] + offsets]  # (B, T+1)
        yield window[:, :-1], window[:, 1:]


def load_balancing_loss(router_logits: Tensor, top_k: int) -> Tensor:
    """Switch-style auxiliary loss ``E * sum_e f_e * P_e`` of one layer.

    ``f_e`` is the fraction of routed slots that chose expert e (no gradient),
    ``P_e`` the mean router probability of e. It equals 1 when routing is
    uniform and grows as tokens pile onto few experts.
    """
    num_experts = router_logits.shape[-1]
    probs = torch.softmax(router_logits.float(), dim=-1)  # (N, E)
    chosen = torch.topk(probs, top_k, dim=-1).indices  # (N, k)
    counts = torch.zeros(num_experts).index_add_(
        0, chosen.reshape(-1), torch.ones(chosen.numel())
    )
    fraction = counts / chosen.numel()  # (E,)
    return num_experts * (fraction * probs.mean(0)).sum()


@dataclass
class TrainLog:
    """Loss curve of one training phase."""

    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    aux_loss: list[float] = field(default_factory=list)
    valid_steps: list[int] = field(default_factory=list)
    valid_loss: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0


def lr_at(step: int, num_steps: int, peak_lr: float, warmup: int) -> float:
    """Linear warmup to ``peak_lr``, then cosine decay to a tenth of it."""
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, num_steps - warmup)
    return peak_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _trainable_params(
    model: torch.nn.Module, trainable: Callable[[str], bool] | None
) -> list[torch.nn.Parameter]:
    # Marks the chosen parameters (by name; default all) as trained, freezes
    # the rest and returns the chosen ones.
    params = []
    for name, param in model.named_parameters():
        param.requires_grad_(trainable is None or trainable(name))
        if param.requires_grad:
            params.append(param)
    return params


# One step's objective: (inputs, targets) -> (loss to log, aux loss, total).
StepLoss = Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]


def _optimize(
    model: Transformer,
    params: list[torch.nn.Parameter],
    step_loss: StepLoss,
    corpus: Corpus,
    *,
    weight_decay: float,
    num_steps: int,
    batch_size: int,
    seq_len: int,
    lr: float,
    seed: int,
    eval_every: int,
    progress: Callable[[int, float], None] | None,
    phase: str,
) -> TrainLog:
    # AdamW over ``params`` with warmup and cosine decay, gradient clipping at
    # 1, validation loss of ``model`` every ``eval_every`` steps; the model is
    # frozen and in eval mode afterwards.
    optimizer = torch.optim.AdamW(
        params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay
    )
    log = TrainLog()
    start = time.perf_counter()
    model.train()
    data = batches(corpus.train, batch_size, seq_len, seed)
    for step in range(num_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, num_steps, lr, warmup=max(1, num_steps // 20))
        inputs, targets = next(data)
        loss, aux, total = step_loss(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        log.steps.append(step)
        log.train_loss.append(loss.item())
        log.aux_loss.append(aux.item())
        if progress is not None:
            progress(step, log.train_loss[-1])
        if (step + 1) % eval_every == 0 or step + 1 == num_steps:
            log.valid_steps.append(step + 1)
            log.valid_loss.append(evaluate(model, corpus.valid, seq_len, seed=1))
            model.train()
            logger.info(
                "%s step %d/%d: train loss %.3f, aux %.3f, valid loss %.3f",
                phase,
                step + 1,
                num_steps,
                log.train_loss[-1],
                log.aux_loss[-1],
                log.valid_loss[-1],
            )
    for param in model.parameters():
        param.requires_grad_(False)
    model.eval()
    log.elapsed_s = time.perf_counter() - start
    return log


def train(
    model: Transformer,
    corpus: Corpus,
    *,
    num_steps: int,
    batch_size: int,
    seq_len: int,
    lr: float,
    seed: int,
    aux_loss_coef: float = 0.0,
    trainable: Callable[[str], bool] | None = None,
    eval_every: int = 100,
    progress: Callable[[int, float], None] | None = None,
) -> TrainLog:
    """Next-token training with AdamW; MoE models add the load-balancing loss.

    Args:
        trainable: which parameters (by name) are trained; default all.
        progress: called after each step with (step, loss), e.g. a progress bar.
    """
    params = _trainable_params(model, trainable)
    is_moe = isinstance(model, Mixtral)

    def step_loss(inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        logits = model(inputs)  # (B, T, V)
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        )
        aux = torch.zeros(())
        if is_moe and aux_loss_coef > 0:
            k = model.config.num_experts_per_tok
            aux = (
                sum(
                    load_balancing_loss(r.router_logits, k)
                    for r in model.last_routing()
                )
                / model.config.num_hidden_layers
            )
        return loss, aux, loss + aux_loss_coef * aux

    return _optimize(
        model,
        params,
        step_loss,
        corpus,
        weight_decay=0.01,
        num_steps=num_steps,
        batch_size=batch_size,
        seq_len=seq_len,
        lr=lr,
        seed=seed,
        eval_every=eval_every,
        progress=progress,
        phase="moe" if is_moe else "dense",
    )


def distill(
    draft: Transformer,
    target: Transformer,
    corpus: Corpus,
    *,
    num_steps: int,
    batch_size: int,
    seq_len: int,
    lr: float,
    seed: int,
    trainable: Callable[[str], bool] | None = None,
    eval_every: int = 100,
    progress: Callable[[int, float], None] | None = None,
) -> TrainLog:
    """Train ``draft`` towards ``target``'s next-token distributions (KL divergence).

    Args:
        trainable: which draft parameters (by name) are trained; default all.
    """
    params = _trainable_params(draft, trainable)
    target.eval()

    def step_loss(inputs: Tensor, _targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        with torch.no_grad():
            teacher = F.log_softmax(target(inputs).float(), dim=-1)  # (B, T, V)
        student = F.log_softmax(draft(inputs).float(), dim=-1)  # (B, T, V)
        loss = F.kl_div(
            student.reshape(-1, student.shape[-1]),
            teacher.reshape(-1, teacher.shape[-1]),
            log_target=True,
            reduction="batchmean",
        )
        return loss, torch.zeros(()), loss

    return _optimize(
        draft,
        params,
        step_loss,
        corpus,
        weight_decay=0.0,
        num_steps=num_steps,
        batch_size=batch_size,
        seq_len=seq_len,
        lr=lr,
        seed=seed,
        eval_every=eval_every,
        progress=progress,
        phase="distil",
    )


def fixed_windows(
    data: Tensor, num_windows: int, seq_len: int, seed: int
) -> tuple[Tensor, Tensor]:
    """The same ``num_windows`` random windows for every model evaluated."""
    return next(batches(data, num_windows, seq_len, seed))


@torch.no_grad()
def evaluate(
    model: Transformer, data: Tensor, seq_len: int, seed: int, num_windows: int = 32
) -> float:
    """Mean next-token cross-entropy (nats per byte) on fixed windows of ``data``."""
    model.eval()
    inputs, targets = fixed_windows(data, num_windows, seq_len, seed)
    logits = model(inputs)  # (B, T, V)
    return float(
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    )


@dataclass
class PairStats:
    """How the draft and target relate on held-out text.

    Attributes:
        greedy_agreement: fraction of positions where both models' argmax agree
            (teacher-forced; greedy speculative decoding accepts at about this rate).
        expert_load: per layer, fraction of routed slots each expert received.
        predictor_top1: per layer, fraction of tokens whose target top-1 expert is
            the router's top-1 on the draft's attention output.
        predictor_recall: per layer, fraction of the target's top-k experts per
            token found in the top-k predicted from the draft.
    """

    greedy_agreement: float
    expert_load: list[list[float]]
    predictor_top1: list[float]
    predictor_recall: list[float]


@torch.no_grad()
def pair_stats(
    draft: Transformer, target: Mixtral, data: Tensor, seq_len: int, seed: int = 2
) -> PairStats:
    """Agreement, expert load and per-token predictor accuracy on fixed windows."""
    inputs, _ = fixed_windows(data, 16, seq_len, seed)
    attn: dict[int, Tensor] = {}
    draft_logits = draft(inputs, on_attention=lambda i, h: attn.__setitem__(i, h))
    target_logits = target(inputs)
    agreement = (draft_logits.argmax(-1) == target_logits.argmax(-1)).float().mean()
    c = target.config
    loads, top1, recall = [], [], []
    for layer, routing in enumerate(target.last_routing()):
        actual = routing.expert_ids  # (N, k)
        counts = torch.bincount(actual.reshape(-1), minlength=c.num_local_experts)
        loads.append((counts / actual.numel()).tolist())
        predicted = target.route(layer, attn[layer]).expert_ids  # (N, k)
        top1.append(float((predicted[:, 0] == actual[:, 0]).float().mean()))
        hits = (predicted[:, :, None] == actual[:, None, :]).any(1)  # (N, k)
        recall.append(float(hits.float().mean()))
    return PairStats(float(agreement), loads, top1, recall)


def is_expert_or_router(name: str) -> bool:
    """Parameters trained in the MoE phase: experts and routers."""
    return ".mlp.experts." in name or ".mlp.gate." in name


def is_mlp(name: str) -> bool:
    """Parameters trained in the distillation phase: the dense MLPs."""
    return ".mlp." in name


__all__ = [
    "BOS_ID",
    "EOS_ID",
    "Corpus",
    "PairStats",
    "TrainLog",
    "check_corpus",
    "corpus_files",
    "distill",
    "evaluate",
    "indent_with_tabs",
    "is_expert_or_router",
    "is_mlp",
    "load_balancing_loss",
    "pair_stats",
    "stdlib_root",
    "train",
]
