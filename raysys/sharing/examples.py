"""Small workloads that show the tenant contract; the demo and tests use them.

`Counter` adds a fixed increment each step; `TinyTrainer` trains a small MLP
on a synthetic regression task whose batch for step ``k`` is drawn from a
generator seeded with ``(seed, k)``, so a run that resumes from a checkpoint
sees exactly the data the uninterrupted run would have seen; `FailsAtStep`
raises from ``step()`` once it reaches a given step.
"""

from __future__ import annotations

import time
from typing import Any


class Counter:
    """``value`` grows by ``increment`` per step; optional sleep per step."""

    def __init__(self, start: int = 0, increment: int = 1, step_delay_s: float = 0.0):
        self.value = start
        self.increment = increment
        self.step_delay_s = step_delay_s
        self.num_steps = 0

    def step(self) -> dict[str, float]:
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        self.value += self.increment
        self.num_steps += 1
        return {"value": float(self.value)}

    def peek(self) -> int:
        """The current value (callable from outside through the platform)."""
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "num_steps": self.num_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = state["value"]
        self.num_steps = state["num_steps"]


class TinyTrainer:
    """A two-layer MLP fitting ``y = sin(x @ w)`` with Adam, one batch per step.

    Args:
        seed: seeds the initial weights, the target and every batch.
        width: hidden width.
        batch_size: rows per batch.
        lr: Adam learning rate.
        step_delay_s: extra sleep per step (stretches a demo run).
    """

    def __init__(
        self,
        seed: int = 0,
        width: int = 32,
        batch_size: int = 64,
        lr: float = 1e-2,
        step_delay_s: float = 0.0,
    ):
        import torch

        torch.set_num_threads(1)
        self.seed, self.batch_size, self.step_delay_s = seed, batch_size, step_delay_s
        g = torch.Generator().manual_seed(seed)
        self.target = torch.randn(8, 1, generator=g) / 8**0.5  # (D, 1)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(8, width), torch.nn.Tanh(), torch.nn.Linear(width, 1)
        )
        with torch.no_grad():
            for p in self.model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.num_steps = 0

    def setup(self, context) -> None:
        self.device = context.device

    def _batch(self, k: int):
        import torch

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
        x = torch.randn(self.batch_size, 8, generator=g)  # (B, D)
        return x, torch.sin(x @ self.target)  # (B, D), (B, 1)

    def step(self) -> dict[str, float]:
        import torch

        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        x, y = self._batch(self.num_steps)
        loss = torch.nn.functional.mse_loss(self.model(x), y)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.num_steps += 1
        return {"loss": float(loss.detach())}

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "num_steps": self.num_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.num_steps = state["num_steps"]


class FailsAtStep(Counter):
    """A counter whose ``step()`` raises ``RuntimeError`` at step ``fail_at``."""

    def __init__(self, fail_at: int, step_delay_s: float = 0.0):
        super().__init__(step_delay_s=step_delay_s)
        self.fail_at = fail_at

    def step(self) -> dict[str, float]:
        if self.num_steps + 1 >= self.fail_at:
            raise RuntimeError(f"deliberate failure at step {self.num_steps + 1}")
        return super().step()


def run_reference(workload: Any, num_steps: int) -> tuple[Any, list[dict[str, float]]]:
    """Run a workload in this process without any fault: its final state and the
    metrics of every step (the fault-free reference)."""
    metrics = [workload.step() for _ in range(num_steps)]
    return workload.state_dict(), metrics
