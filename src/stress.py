"""Failure mechanisms on demand, applied to a built model or its batches.

The tiny random model does not break at ordinary settings; pretrained Qwen2.5-VL has
properties that make it break. Each option reproduces one documented mechanism (the YAML
under conf/stress/ names the report it follows):
- logit_growth: q/k projections scaled so the largest attention logit starts at
  `target_logit` in every layer of both towers (Wortsman et al. 2023; Dehghani et al. 2023).
- outliers: a few residual-stream channels carry massive activations of size `magnitude`,
  added by the first MLP of each tower (Sun et al. 2024; vLLM issue 13817 in fp16).
- masked_rows: every sequence gets `pad` extra left-padding tokens, so the padded query
  rows are fully masked (transformers issue 35151, PyTorch issue 103749).
- lr_spike: the learning rate is multiplied by `factor` for `length` steps from `at`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .monitor import AttentionStats

STRESSES = ("none", "logit_growth", "outliers", "masked_rows", "lr_spike")


@dataclass
class StressSpec:
    name: str = "none"
    mechanism: str = ""          # documentation only (from the YAML)
    reference: str = ""          # documentation only
    target_logit: float = 60.0   # logit_growth
    magnitude: float = 1e5       # outliers: above fp16's 65,504
    channels: int = 2            # outliers
    pad: int = 6                 # masked_rows
    factor: float = 30.0         # lr_spike
    at: int = 20                 # lr_spike
    length: int = 3              # lr_spike


def check(spec: StressSpec) -> None:
    if spec.name not in STRESSES:
        raise ValueError(f"stress={spec.name}: allowed {', '.join(STRESSES)}")


@torch.no_grad()
def apply_to_model(spec: StressSpec, model, batch: dict, compute_loss: Callable) -> None:
    """Weight-level stresses, calibrated on one batch so they hold whatever the init."""
    if spec.name == "logit_growth":
        _grow_logits(spec, model, batch, compute_loss)
    elif spec.name == "outliers":
        _massive_activations(spec, model)


def _grow_logits(spec, model, batch, compute_loss, passes: int = 4):
    """Scale q and k by sqrt(target / max logit) per layer. A layer's logits also depend on
    the layers before it, so repeat until every layer is within 1% of the target."""
    stats = AttentionStats(model)
    modules = dict(model.named_modules())
    for _ in range(passes):
        with stats.active():
            compute_loss(batch)
        scales = {name: (spec.target_logit / max(s["max_logit"], 1e-6)) ** 0.5
                  for name, s in stats.summary().items()}
        if all(abs(sc * sc - 1) < 0.01 for sc in scales.values()):
            return
        for name, scale in scales.items():
            attn = modules[name]
            if hasattr(attn, "qkv"):  # vision: fused q|k|v rows
                d = attn.qkv.out_features // 3
                attn.qkv.weight[: 2 * d] *= scale
                attn.qkv.bias[: 2 * d] *= scale
            else:
                for proj in (attn.q_proj, attn.k_proj):
                    proj.weight *= scale
                    if proj.bias is not None:
                        proj.bias *= scale


def _massive_activations(spec, model):
    """Sun et al. find massive activations act as fixed biases on a few residual channels.
    The first MLP of each tower adds `magnitude` to `channels` of its output: in fp16 the
    offset itself is inf (past 65,504), as an overflowing accumulation would be; in bf16 and
    fp32 it is a large finite value. A hook, not a weight, so training cannot unlearn it."""
    inner = model.model
    for mlp in (inner.visual.blocks[0].mlp, inner.language_model.layers[0].mlp):
        offset = torch.zeros(mlp.down_proj.out_features)
        offset[: spec.channels] = spec.magnitude

        def add(mod, args, out, offset=offset):
            return out + offset.to(device=out.device, dtype=out.dtype)

        mlp.register_forward_hook(add)


def lr_multiplier(spec: StressSpec) -> Callable[[int], float] | None:
    if spec.name != "lr_spike":
        return None
    return lambda step: spec.factor if spec.at <= step < spec.at + spec.length else 1.0


def batch_transform(spec: StressSpec, pad_token_id: int) -> Callable[[dict], dict] | None:
    if spec.name != "masked_rows":
        return None

    def left_pad(batch: dict) -> dict:
        n = spec.pad
        out = dict(batch)
        for key, value in (("input_ids", pad_token_id), ("attention_mask", 0),
                           ("labels", -100), ("mm_token_type_ids", 0)):
            if key in batch:
                t = batch[key]
                out[key] = torch.cat([t.new_full((t.shape[0], n), value), t], dim=1)
        return out
    return left_pad
