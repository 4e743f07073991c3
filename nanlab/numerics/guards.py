"""Numerical guards at key nodes: the seed's "protection logic", an axis of the map.

- skip_step: skip the optimizer step when any gradient is non-finite (what fp16's loss
  scaler does; in bf16 nothing does it, and one NaN gradient element turns the clipped
  gradient, and after AdamW every parameter, into NaN).
- clamp: clamp half-precision hidden states of both towers to the finite fp16 range after
  every block (what vLLM does for the Qwen2.5-VL vision tower in fp16).
"""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import Callback

from nanlab.config.options import GUARD
from nanlab.config.specs import GuardSpec


class SkipNonFiniteStep(Callback):
    """Drops every gradient of a step with a non-finite one: AdamW skips parameters whose
    .grad is None, so the weights and moments stay as they were."""

    def __init__(self):
        self.fired = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if grads and not torch.isfinite(torch.stack(torch._foreach_norm(grads))).all():
            self.fired += 1
            for g in optimizer.param_groups:
                for p in g["params"]:
                    p.grad = None


class ClampHalfHidden:
    """Forward hooks on every vision block and decoder layer."""

    def __init__(self, model):
        self.fired = 0
        inner = model.model if hasattr(model, "model") else model
        blocks = list(inner.visual.blocks) + list(inner.language_model.layers)
        self.handles = [b.register_forward_hook(self._hook) for b in blocks]

    def _hook(self, module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        half = hidden.dtype == torch.float16 or (
            torch.is_autocast_enabled(hidden.device.type)
            and torch.get_autocast_dtype(hidden.device.type) == torch.float16
        )
        if not half:
            return None
        limit = torch.finfo(torch.float16).max - 1000  # vLLM's margin
        if not (hidden.abs() <= limit).all():  # also true for inf (NaN stays NaN, as in vLLM)
            self.fired += 1
        clamped = hidden.clamp(-limit, limit)
        return (clamped, *output[1:]) if isinstance(output, tuple) else clamped

    def remove(self):
        for h in self.handles:
            h.remove()


def build_guard(spec: GuardSpec, model) -> tuple[list[Callback], object | None]:
    """Callbacks for the trainer and the object whose `.fired` counts interventions
    (nanlab.config.options.GUARD names each option's builder below)."""
    option = GUARD[spec.name]
    return option.resolve("build")(model) if option.does("build") else ([], None)


def skip_step_guard(model) -> tuple[list[Callback], SkipNonFiniteStep]:
    cb = SkipNonFiniteStep()
    return [cb], cb


def clamp_guard(model) -> tuple[list[Callback], ClampHalfHidden]:
    return [], ClampHalfHidden(model)
