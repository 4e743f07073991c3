"""The LightningModule: loss on supervised tokens, AdamW, warmup + cosine schedule."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
from transformers import get_cosine_schedule_with_warmup

from .model import is_vision_param


@dataclass
class OptimSpec:
    lr: float = 1e-4
    warmup_steps: int = 0
    clip: float = 1.0          # gradient-norm clip; 0 turns it off (the Trainer applies it)
    max_steps: int = 100
    weight_decay: float = 0.0
    vision_lr: float | None = None


def supervised_loss(model, batch: dict) -> torch.Tensor:
    """Mean cross-entropy over supervised (assistant) tokens, as the model's own loss: over
    zero supervised tokens it is 0/0 = NaN, as transformers' is (stress=empty_targets).

    Logits are computed only at positions whose next token is supervised (transformers'
    `logits_to_keep`): the 151,936-way lm_head is most of the tiny model's compute."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "sample_ids")}
    targets = batch["labels"][:, 1:]
    keep = (targets != -100).any(dim=0).nonzero().squeeze(1)
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), targets[:, keep].flatten(),
                           ignore_index=-100)


class NanLabModule(L.LightningModule):
    def __init__(self, model, optim: OptimSpec,
                 lr_multiplier: Callable[[int], float] | None = None,
                 batch_transform: Callable[[dict, int], dict] | None = None):
        super().__init__()
        self.model = model
        self.optim = optim
        # stress=lr_spike multiplies the schedule for a few steps
        self.lr_multiplier = lr_multiplier or (lambda step: 1.0)
        # stress=grad_poison pads one sample on the left every few steps
        self.batch_transform = batch_transform

    def transform(self, batch: dict, step: int | None = None) -> dict:
        if self.batch_transform is None:
            return batch
        if step is None:
            step = self.trainer.global_step if self._trainer is not None else 0
        return self.batch_transform(batch, step)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        return self.transform(batch)

    def compute_loss(self, batch: dict) -> torch.Tensor:
        return supervised_loss(self.model, batch)

    def training_step(self, batch, batch_idx):
        loss = self.compute_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["labels"].shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self.compute_loss(batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["labels"].shape[0])
        return loss

    def configure_optimizers(self):
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        vision_lr = self.optim.vision_lr
        groups = [{"params": [p for n, p in named if vision_lr is None or not is_vision_param(n)],
                   "lr": self.optim.lr}]
        if vision_lr is not None:
            groups.append({"params": [p for n, p in named if is_vision_param(n)], "lr": vision_lr})
        groups = [g for g in groups if g["params"]]
        # foreach: the CPU default is a per-tensor loop, several times slower here
        optimizer = torch.optim.AdamW(groups, weight_decay=self.optim.weight_decay, foreach=True)
        cosine = get_cosine_schedule_with_warmup(optimizer, self.optim.warmup_steps,
                                                 self.optim.max_steps)
        # Compose the cosine schedule with the stress multiplier (1 unless lr_spike).
        base = cosine.lr_lambdas[0]
        cosine.lr_lambdas = [lambda s: base(s) * self.lr_multiplier(s)] * len(groups)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": cosine, "interval": "step"}}
