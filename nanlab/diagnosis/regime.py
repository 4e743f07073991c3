"""The regime a run trained in, in dimensionless numbers, at its first and last step.

Whether the map measures a fine-tuning world is a question of scale, not of lr: a weight moved
by lr means nothing until it is compared with the weight. Per tower (vision with the merger,
text) this records, at step 0 and at the run's last step (max_steps - 1):

- the relative update size: RMS(W_after - W_before) / RMS(W_before) of each trainable 2-D
  weight across that step's optimizer step, the median over the tower's tensors (AdamW's first
  step moves every weight by about lr, so at step 0 it is about lr / RMS(W));
- the largest attention logit and the mean attention entropy (nats, over the tower's layers
  and query rows), from attention_stats.AttentionStats during that step's forward.

A run that stops before its last step has no "last" numbers (None): its record says where it
stopped instead. Two steps a run are measured, so the cost is one copy of the trainable weights
and one observed forward, twice.
"""

from __future__ import annotations

import math
import statistics

import torch
from lightning.pytorch.callbacks import Callback

from nanlab.diagnosis.attention_stats import AttentionStats

TOWERS = ("vision", "text")
FIELDS = tuple(
    f"{what}_{when}_{tower}"
    for what in ("rel_update", "attn_max_logit", "attn_entropy")
    for when in ("first", "last")
    for tower in TOWERS
)


def tower_of(name: str) -> str:
    """The tower a parameter or module belongs to (the merger counts with vision)."""
    return "vision" if ".visual." in f".{name}" else "text"


class RegimeWatch(Callback):
    def __init__(self, model, last_step: int):
        self.model, self.last_step = model, last_step
        self.stats = AttentionStats(model)
        self.values: dict[str, float | None] = dict.fromkeys(FIELDS)
        self._ctx = None
        self._when: str | None = None
        self._before: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        self._when = "first" if step == 0 else "last" if step == self.last_step else None
        if self._when is not None:
            self._ctx = self.stats.active()
            self._ctx.__enter__()

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self._when is None:
            return
        self._close_stats()
        self._before = {
            n: p.detach().float().clone()
            for n, p in self.model.named_parameters()
            if p.requires_grad and p.dim() == 2
        }

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._when is None:
            return
        self._close_stats()
        params = dict(self.model.named_parameters())
        ratios: dict[str, list[float]] = {t: [] for t in TOWERS}
        for name, before in self._before.items():
            rms = before.pow(2).mean().sqrt().item()
            if rms > 0 and math.isfinite(rms):
                delta = (params[name].detach().float() - before).pow(2).mean().sqrt().item()
                ratios[tower_of(name)].append(delta / rms)
        for tower, values in ratios.items():
            finite = [v for v in values if math.isfinite(v)]
            self.values[f"rel_update_{self._when}_{tower}"] = (
                statistics.median(finite) if finite else None
            )
        self._before, self._when = {}, None

    def _close_stats(self) -> None:
        """End the step's attention observation and keep its per-tower summary."""
        if self._ctx is None:
            return
        self._ctx.__exit__(None, None, None)
        self._ctx = None
        by_tower: dict[str, list[dict]] = {t: [] for t in TOWERS}
        for name, s in self.stats.summary().items():
            by_tower[tower_of(name)].append(s)
        for tower, layers in by_tower.items():
            logits = [s["max_logit"] for s in layers if math.isfinite(s["max_logit"])]
            ents = [s["entropy"] for s in layers if math.isfinite(s["entropy"])]
            self.values[f"attn_max_logit_{self._when}_{tower}"] = max(logits) if logits else None
            self.values[f"attn_entropy_{self._when}_{tower}"] = (
                sum(ents) / len(ents) if ents else None
            )

    def on_train_end(self, trainer, pl_module):
        if self._ctx is not None:  # stopped inside a measured step
            self._ctx.__exit__(None, None, None)
            self._ctx = None

    def fill(self, record) -> None:
        for key, value in self.values.items():
            setattr(record, key, None if value is None else round(float(value), 6))
