"""The training objective, on the ground floor: the fine-tuning run (run/module.py), the tiny
base's pretraining (model/base.py), the stress calibration (run/build.py) and the probe all
compute the loss here, so none of them imports another's room for it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def supervised_loss(
    model, batch: dict, z_loss: float = 0.0, parts: dict | None = None
) -> torch.Tensor:
    """Mean cross-entropy over supervised (assistant) tokens, as the model's own loss: over
    zero supervised tokens it is 0/0 = NaN, as transformers' is (stress=empty_targets).
    With `z_loss` > 0, plus z_loss x mean(logsumexp(logits)^2) over the same positions
    (PaLM); `parts`, when given, receives the cross-entropy and mean log Z (floats).

    Logits are computed only at positions whose next token is supervised (transformers'
    `logits_to_keep`): the 151,936-way lm_head is most of the tiny model's compute."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "sample_ids")}
    targets = batch["labels"][:, 1:]
    keep = (targets != -100).any(dim=0).nonzero().squeeze(1)
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits.float()
    kept = targets[:, keep]
    loss = F.cross_entropy(logits.flatten(0, 1), kept.flatten(), ignore_index=-100)
    if parts is None and not z_loss:
        return loss
    log_z = logits.logsumexp(dim=-1)[kept != -100]  # supervised positions only
    if parts is not None:
        parts["ce"] = float(loss.detach())
        parts["log_z"] = float(log_z.detach().mean()) if log_z.numel() else math.nan
    if z_loss:
        loss = loss + z_loss * log_z.pow(2).mean()  # mean over none is NaN, as the loss is
    return loss
