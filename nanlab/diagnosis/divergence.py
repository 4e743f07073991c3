"""The divergence and spike watch over the loss history: plain Python, one finite loss at a
time, in step order.

- a spike: a loss above `spike_factor` x its moving average (counted, the run goes on);
- diverged: a loss above `diverge_factor` x the lowest loss so far for `patience` steps in
  a row. The failure is dated to the first step of that run of steps, not to the step
  where the patience ran out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Diverged:
    first_step: int  # the first of the `patience` steps above the threshold
    detail: str  # for the record's cause_detail
    ratio: float  # the last loss / the lowest loss (the record's cause_value)


class DivergenceWatch:
    def __init__(self, diverge_factor: float, patience: int, spike_factor: float):
        self.diverge_factor = diverge_factor
        self.patience = patience
        self.spike_factor = spike_factor
        self.spikes = 0
        self.ema: float | None = None  # the moving average spikes are measured against
        self.min_loss = math.inf
        self.above = 0  # steps in a row above diverge_factor x min_loss

    def update(self, step: int, loss: float) -> Diverged | None:
        """Take one finite loss; return the divergence once the patience has run out."""
        if self.ema is not None and loss > self.spike_factor * self.ema:
            self.spikes += 1
        self.ema = loss if self.ema is None else 0.9 * self.ema + 0.1 * loss
        self.min_loss = min(self.min_loss, loss)
        if loss <= self.diverge_factor * self.min_loss:
            self.above = 0
            return None
        self.above += 1
        if self.above < self.patience:
            return None
        detail = (
            f"loss {loss:.3g} > {self.diverge_factor:g} x its minimum "
            f"{self.min_loss:.3g} for {self.patience} steps"
        )
        return Diverged(step - self.patience + 1, detail, loss / self.min_loss)
