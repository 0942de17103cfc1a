"""Train the SP-MoE draft/target pair on the Python standard library's sources.

    python jobs/moe_train.py --out-dir raysys/moe/pretrained

A tiny dense Llama is trained on the running interpreter's stdlib ``.py`` files
(byte tokenizer) and sparse-upcycled into a Mixtral, whose experts and routers
are trained on with a load-balancing loss: that is the target. The dense
model's MLPs are then distilled from the target: that is the draft. Both are Hugging Face folders (``config.json`` +
``model.safetensors``, float16). Writes ``train_report.json`` and
``train_loss.png`` next to them.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch
from pydantic import Field, ValidationError, model_validator
from tqdm import tqdm

from raysys.models.hf import save_model
from raysys.models.llama import Llama, tiny_llama_config
from raysys.models.mixtral import upcycle
from raysys.moe import training
from raysys.runtime import Config, Report, run_job
from raysys.runtime.config import OutputDir

logger = logging.getLogger("moe_train")

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "raysys" / "moe" / "pretrained"
MAX_POSITIONS = 2048  # positions of both models


class TrainConfig(Config):
    """Train the dense draft, upcycle it and train the MoE target."""

    out_dir: OutputDir = Field(
        DEFAULT_OUT, description="folder for draft/, target/ and the report"
    )
    corpus_dir: str | None = Field(
        None, description="folder of .py files (default: this Python's stdlib)"
    )
    num_layers: int = Field(4, gt=0, description="decoder layers of both models")
    hidden_size: int = Field(64, gt=0, description="model width of both models")
    intermediate_size: int = Field(192, gt=0, description="MLP / expert inner width")
    num_heads: int = Field(4, gt=0, description="attention query heads")
    num_kv_heads: int = Field(2, gt=0, description="attention key/value heads")
    num_experts: int = Field(8, gt=1, description="experts per target layer")
    top_k: int = Field(2, gt=0, description="experts per token in the target")
    seq_len: int = Field(
        256, gt=8, le=MAX_POSITIONS, description="training window in bytes"
    )
    batch_size: int = Field(16, gt=0, description="windows per step")
    dense_steps: int = Field(450, gt=0, description="training steps of the draft")
    dense_lr: float = Field(4e-3, gt=0, description="peak learning rate, dense")
    moe_steps: int = Field(300, gt=0, description="training steps after upcycling")
    moe_lr: float = Field(2e-3, gt=0, description="peak learning rate, MoE phase")
    distill_steps: int = Field(
        150, ge=0, description="steps distilling the target into the draft's MLPs"
    )
    distill_lr: float = Field(2e-3, gt=0, description="peak learning rate, distil")
    aux_loss_coef: float = Field(
        0.02, ge=0, description="weight of the load-balancing loss"
    )
    router_std: float = Field(0.02, gt=0, description="std of the new routers")
    seed: int = Field(0, description="seed of init, data order and routers")
    num_threads: int = Field(1, gt=0, description="torch CPU threads")

    @model_validator(mode="after")
    def _check_architecture(self) -> TrainConfig:
        # Checked with the flags: the target is built only after the draft has
        # trained, so a bad top-k would otherwise surface minutes in.
        if self.top_k > self.num_experts:
            raise ValueError(
                f"--top-k {self.top_k} is more than --num-experts "
                f"{self.num_experts}; give at most {self.num_experts}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"--hidden-size {self.hidden_size} is not divisible by --num-heads "
                f"{self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"--num-heads {self.num_heads} is not a multiple of --num-kv-heads "
                f"{self.num_kv_heads}"
            )
        try:
            model_config(self)
        except ValidationError as e:
            raise ValueError(e.errors()[0]["msg"].removeprefix("Value error, ")) from e
        return self


class TrainReport(Report):
    """What the training produced."""

    corpus_files: int = Field(description="source files read")
    train_tokens: int = Field(description="bytes in the training split")
    valid_tokens: int = Field(description="bytes in the validation split")
    dense_valid_loss: float = Field(
        description="dense model validation loss before distillation (nats/byte)"
    )
    draft_valid_loss: float = Field(description="draft validation loss (nats/byte)")
    moe_valid_loss: float = Field(description="target validation loss (nats/byte)")
    upcycled_valid_loss: float = Field(
        description="target validation loss right after upcycling (equals dense)"
    )
    dense_train_s: float = Field(description="seconds training the draft")
    moe_train_s: float = Field(description="seconds training the target")
    distill_s: float = Field(description="seconds distilling the draft")
    greedy_agreement: float = Field(
        description="held-out positions where draft and target argmax agree"
    )
    greedy_agreement_before_distill: float = Field(
        description="the same for the dense model before distillation"
    )
    expert_load: list[list[float]] = Field(
        description="per layer, share of routed slots per expert"
    )
    predictor_top1: list[float] = Field(
        description="per layer, target top-1 expert predicted from the draft"
    )
    predictor_recall: list[float] = Field(
        description="per layer, target top-k experts found in the predicted top-k"
    )
    draft_dir: str = Field(description="saved draft checkpoint, under out_dir")
    target_dir: str = Field(description="saved target checkpoint, under out_dir")
    dense_log: dict = Field(description="draft loss curve")
    moe_log: dict = Field(description="target loss curve")
    distill_log: dict = Field(description="draft distillation curve")


def model_config(cfg: TrainConfig):
    """The dense draft's architecture (the target adds the experts)."""
    return tiny_llama_config(
        num_hidden_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=MAX_POSITIONS,
    )


def _bar(total: int, desc: str):
    bar = tqdm(total=total, desc=desc, file=sys.stderr, mininterval=5.0)

    def update(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

    return bar, update


def main(cfg: TrainConfig) -> TrainReport:
    torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out_dir)
    files = training.corpus_files(cfg.corpus_dir)
    corpus = training.Corpus.build(files)
    logger.info(
        "corpus: %d files, %d training and %d validation bytes",
        len(files),
        corpus.train.numel(),
        corpus.valid.numel(),
    )
    training.check_corpus(corpus, cfg.seq_len)  # before any training
    dense = Llama(model_config(cfg))
    dense.init_weights(seed=cfg.seed)
    common = {"batch_size": cfg.batch_size, "seq_len": cfg.seq_len}

    bar, update = _bar(cfg.dense_steps, "dense")
    dense_log = training.train(
        dense,
        corpus,
        num_steps=cfg.dense_steps,
        lr=cfg.dense_lr,
        seed=cfg.seed,
        progress=update,
        **common,
    )
    bar.close()
    dense_loss = training.evaluate(dense, corpus.valid, cfg.seq_len, seed=1)

    target = upcycle(
        dense, cfg.num_experts, cfg.top_k, router_std=cfg.router_std, seed=cfg.seed
    )
    upcycled_loss = training.evaluate(target, corpus.valid, cfg.seq_len, seed=1)
    bar, update = _bar(cfg.moe_steps, "moe")
    moe_log = training.train(
        target,
        corpus,
        num_steps=cfg.moe_steps,
        lr=cfg.moe_lr,
        seed=cfg.seed + 1,
        aux_loss_coef=cfg.aux_loss_coef,
        trainable=training.is_expert_or_router,
        progress=update,
        **common,
    )
    bar.close()
    moe_loss = training.evaluate(target, corpus.valid, cfg.seq_len, seed=1)
    before = training.pair_stats(dense, target, corpus.valid, cfg.seq_len)

    bar, update = _bar(cfg.distill_steps, "distil")
    distill_log = training.distill(
        dense,
        target,
        corpus,
        num_steps=cfg.distill_steps,
        lr=cfg.distill_lr,
        seed=cfg.seed + 2,
        trainable=training.is_mlp,
        progress=update,
        **common,
    )
    bar.close()
    draft_loss = training.evaluate(dense, corpus.valid, cfg.seq_len, seed=1)
    stats = training.pair_stats(dense, target, corpus.valid, cfg.seq_len)

    draft_dir = save_model(dense.to(torch.float16), out / "draft")
    target_dir = save_model(target.to(torch.float16), out / "target")
    report = TrainReport(
        corpus_files=len(files),
        train_tokens=corpus.train.numel(),
        valid_tokens=corpus.valid.numel(),
        dense_valid_loss=dense_loss,
        draft_valid_loss=draft_loss,
        moe_valid_loss=moe_loss,
        upcycled_valid_loss=upcycled_loss,
        dense_train_s=dense_log.elapsed_s,
        moe_train_s=moe_log.elapsed_s,
        distill_s=distill_log.elapsed_s,
        greedy_agreement=stats.greedy_agreement,
        greedy_agreement_before_distill=before.greedy_agreement,
        expert_load=stats.expert_load,
        predictor_top1=stats.predictor_top1,
        predictor_recall=stats.predictor_recall,
        draft_dir=draft_dir.name,
        target_dir=target_dir.name,
        dense_log=vars(dense_log),
        moe_log=vars(moe_log),
        distill_log=vars(distill_log),
    )
    report.write(out / "train_report.json")
    _plot(dense_log, moe_log, distill_log, out / "train_loss.png")
    print(
        f"valid loss: dense {dense_loss:.3f}, target {moe_loss:.3f} (upcycled "
        f"{upcycled_loss:.3f}), draft {draft_loss:.3f}; agreement "
        f"{before.greedy_agreement:.3f} -> {stats.greedy_agreement:.3f}; "
        f"predictor top-1 {[round(x, 3) for x in stats.predictor_top1]}"
    )
    print(f"wrote {draft_dir} and {target_dir}")
    return report


def _plot(
    dense_log: training.TrainLog,
    moe_log: training.TrainLog,
    distill_log: training.TrainLog,
    path: Path,
):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    offset = len(dense_log.steps)
    ax.plot(dense_log.valid_steps, dense_log.valid_loss, "o-", label="draft (dense)")
    ax.plot(
        [offset + s for s in moe_log.valid_steps],
        moe_log.valid_loss,
        "s-",
        label="target (upcycled MoE)",
    )
    ax.axvline(offset, color="grey", lw=0.8, ls="--")
    later = offset + len(moe_log.steps)
    ax.plot(
        [later + s for s in distill_log.valid_steps],
        distill_log.valid_loss,
        "^-",
        label="draft (dense, MLPs distilled)",
    )
    ax.axvline(later, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    start = time.perf_counter()
    code = run_job(TrainConfig, main)
    logger.info("done in %.0f s", time.perf_counter() - start)
    sys.exit(code)
