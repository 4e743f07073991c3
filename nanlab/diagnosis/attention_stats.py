"""Attention statistics per layer: largest logit, mean entropy, non-finite weights; and the
monitor's sampling of them.

The monitor samples them every `monitor.every` steps; the probe, the serving pass and the
logit_growth stress use them too. They observe the attention functions through
`attention.OBSERVERS` while `active()`, so no module is wrapped.

Each observed call reads its three numbers on the host (`.item()`): on a GPU a sampled step
waits for the device a few times per layer. That is the price of sampling, paid every
`every` steps, not every step.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from nanlab.numerics import attention


class AttentionStats:
    """Per attention layer: largest logit, mean entropy, non-finite weights. Observes the
    attention functions through `attention.OBSERVERS` while active."""

    def __init__(self, model):
        self.names = {id(m): n for n, m in model.named_modules()}
        self.stats: dict[str, dict] = {}

    def __call__(self, module, query, key, mask, scaling, weights, out):
        name = self.names.get(id(module))
        if name is None:
            return  # another model's attention
        with torch.no_grad():
            k = attention.repeat_kv(key, getattr(module, "num_key_value_groups", 1))
            logits = torch.matmul(query.float(), k.float().transpose(2, 3)) * scaling
            masked = attention._masked(mask)
            if masked is not None:
                logits = logits.masked_fill(masked, float("-inf"))
            finite = torch.isfinite(logits)
            top = logits[finite].max().item() if finite.any() else float("nan")
            p = weights.float() if weights is not None else torch.softmax(logits, dim=-1)
            ent = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
            ent = ent[torch.isfinite(ent)].mean().item() if torch.isfinite(ent).any() else math.nan
            watched = weights if weights is not None else out
            bad = (~torch.isfinite(watched)).sum().item()
        # the dtype the attention probabilities (or, for sdpa, outputs) were computed in
        s = self.stats.setdefault(
            name,
            {
                "max_logit": -math.inf,
                "entropy": [],
                "nonfinite": 0,
                "dtype": str(watched.dtype).replace("torch.", ""),
            },
        )
        s["max_logit"] = max(s["max_logit"], top) if not math.isnan(top) else s["max_logit"]
        s["entropy"].append(ent)
        s["nonfinite"] += bad

    @contextlib.contextmanager
    def active(self):
        """Observe while inside; starts from empty statistics."""
        self.stats = {}
        attention.OBSERVERS.append(self)
        try:
            yield self
        finally:
            attention.OBSERVERS.remove(self)

    def summary(self) -> dict[str, dict]:
        return {
            n: {
                "max_logit": s["max_logit"],
                "nonfinite": s["nonfinite"],
                "dtype": s["dtype"],
                "entropy": float(sum(s["entropy"]) / max(len(s["entropy"]), 1)),
            }
            for n, s in self.stats.items()
        }


class SampledAttention:
    """The monitor's attention statistics: sampled every `every` steps (0: never), logged as
    metrics, and summed up for the record as the largest logit and the dtype attention ran
    in. With deferred checks a sampled step counts only once a read has found that it came
    before any failure (`count_up_to`); a run that failed stopped there."""

    def __init__(self, model, every: int):
        self.stats = AttentionStats(model)
        self.every = every
        self.max_logit: float | None = None
        self.dtype: str | None = None
        self.unread: list[tuple[int, dict]] = []  # deferred: (step, summary), not yet counted
        self._ctx: Any = None
        self._step = 0

    def start(self, step: int) -> None:
        if self.every and step % self.every == 0:
            self._ctx = self.stats.active()
            self._ctx.__enter__()
            self._step = step

    def close(self, trainer, deferred: bool) -> None:
        """End the sampled step's observation (if any): log it, and count it now or, when
        deferred, once read."""
        if self._ctx is None:
            return
        self._ctx.__exit__(None, None, None)
        self._ctx = None
        summary = self.stats.summary()
        if deferred:
            self.unread.append((self._step, summary))
        else:
            self.count(summary)
        metrics = {}
        for name, s in summary.items():
            short = name.replace("model.", "").replace("language_model.layers", "llm")
            short = short.replace("visual.blocks", "vit")
            metrics[f"attn/{short}/max_logit"] = s["max_logit"]
            metrics[f"attn/{short}/entropy"] = s["entropy"]
            metrics[f"attn/{short}/nonfinite"] = float(s["nonfinite"])
        if trainer.loggers and metrics:
            for lg in trainer.loggers:
                lg.log_metrics(metrics, step=trainer.global_step)

    def count(self, summary: dict) -> None:
        self.count_logits(summary)
        for s in summary.values():
            self.dtype = s["dtype"]

    def count_logits(self, summary: dict) -> None:
        """The largest finite logit so far (a replay's too: the failing step's count)."""
        logits = [s["max_logit"] for s in summary.values() if math.isfinite(s["max_logit"])]
        if logits:
            top = max(logits)
            self.max_logit = top if self.max_logit is None else max(self.max_logit, top)

    def count_up_to(self, stop: int | None) -> None:
        """Count the unread sampled steps up to `stop` (None: all) and forget the rest."""
        for step, summary in self.unread:
            if stop is None or step <= stop:
                self.count(summary)
        self.unread = []

    def drop(self, step: int) -> None:
        """Forget an unread step's own statistics (sync mode located a failure mid-step,
        and the replay's observation replaced the step's)."""
        self.unread = [(s, summary) for s, summary in self.unread if s != step]
