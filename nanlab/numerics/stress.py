"""Failure mechanisms, applied to a built model, its schedule or its batches.

Each option is one documented mechanism; its YAML under conf/stress/ holds the paragraph,
the reference, the cause the monitor records when it fires, the baseline overrides under
which it fails on the tiny base, and the predictions the map tests. Every mechanism fails
through computation on transformers' code path, never by writing inf or NaN anywhere:
- logit_growth: q/k projections scaled so the largest attention logit starts at
  `target_logit` in every layer of both towers; training at a high lr grows them further.
- fp16_overflow: massive activations planted in the first decoder MLP of the base, on the
  `token` embedding only, of size `magnitude` (finite in bf16/fp32; past fp16's max only as
  the down projection's output).
- masked_rows / grad_poison: the 4D mask built as summed float-min planes (`mask`), see
  attention.summed_planes_mask; grad_poison also left-pads one sample by `pad` tokens every
  `every` batches.
- empty_targets, pixel_range: data settings only (data.max_length, data.pixel_max).
- lr_spike: the learning rate is multiplied by `factor` for `length` steps from `at`.
- serving_masked_rows: nothing in training; judged on the run's test pass (nanlab/run/serve.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from nanlab.config.options import STRESS
from nanlab.config.specs import StressSpec
from nanlab.diagnosis.attention_stats import AttentionStats

# What each mechanism does to the run is its entry in nanlab.config.options.STRESS: a
# `model` role (weights, calibrated on one batch), a `batch` role (a per-step transform) or an
# `lr` role (a multiplier of the schedule); the functions below are those roles.


def needs_model(spec: StressSpec) -> bool:
    """The mechanism changes the weights: it needs a calibration batch (`apply_to_model`)."""
    return STRESS[spec.name].does("model")


@torch.no_grad()
def apply_to_model(
    spec: StressSpec, model, batch: dict, compute_loss: Callable, token_id: int | None = None
) -> None:
    """Weight-level stresses, calibrated on one batch so they hold whatever the init."""
    option = STRESS[spec.name]
    if option.does("model"):
        option.resolve("model")(spec, model, batch, compute_loss, token_id)


def grow_logits(spec, model, batch, compute_loss, token_id=None, passes: int = 4):
    """Scale q and k by sqrt(target / max logit) per layer. A layer's logits also depend on
    the layers before it, so repeat until every layer is within 1% of the target."""
    stats = AttentionStats(model)
    modules = dict(model.named_modules())
    for _ in range(passes):
        with stats.active():
            compute_loss(batch)
        scales = {
            name: (spec.target_logit / max(s["max_logit"], 1e-6)) ** 0.5
            for name, s in stats.summary().items()
        }
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


def plant_massive_activations(spec, model, batch, compute_loss, token_id: int):
    """Sun et al.: massive activations sit on a few tokens, in a few channels, written by an
    early MLP. One intermediate unit of the first decoder MLP is pointed at the `token`'s
    MLP input (gate and up rows along it: silu(a s) * a s grows as s^2, so other tokens,
    less aligned, get far less), and its down-projection column writes `magnitude` into
    `channels` residual channels for that token. Weights stay small (finite in fp16); the
    down projection's output is what passes fp16's max."""
    mlp = model.model.language_model.layers[0].mlp
    seen: list[torch.Tensor] = []
    handle = mlp.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    try:
        compute_loss(batch)
    finally:
        handle.remove()
    x = seen[0].float()  # (batch, seq, hidden)
    at = batch["input_ids"] == token_id
    if not at.any():
        raise ValueError(f"stress.token={spec.token}: not in the calibration batch")
    target = x[at].mean(0)
    direction = target / target.norm()
    scale = 20.0 / float((x[at] @ direction).mean())  # the token's gate input: about 20
    unit = 0  # the unit we repurpose
    mlp.gate_proj.weight[unit] = scale * direction
    mlp.up_proj.weight[unit] = scale * direction
    act = torch.nn.functional.silu(torch.tensor(20.0)) * 20.0
    mlp.down_proj.weight[:, unit] = 0.0
    mlp.down_proj.weight[: spec.channels, unit] = spec.magnitude / float(act)


def lr_multiplier(spec: StressSpec) -> Callable[[int], float] | None:
    option = STRESS[spec.name]
    return option.resolve("lr")(spec) if option.does("lr") else None


def batch_transform(spec: StressSpec, pad_token_id: int) -> Callable[[dict, int], dict] | None:
    option = STRESS[spec.name]
    return option.resolve("batch")(spec, pad_token_id) if option.does("batch") else None


def spike_lr(spec: StressSpec) -> Callable[[int], float]:
    """lr_spike: the schedule times `factor` for `length` steps from step `at`."""
    return lambda step: spec.factor if spec.at <= step < spec.at + spec.length else 1.0


def poison_padding(spec: StressSpec, pad_token_id: int) -> Callable[[dict, int], dict]:
    """grad_poison: on every `every`-th step, sample 0 gets `pad` pad tokens on the left and
    the others as many on the right, so only that one sample has fully masked query rows."""

    def poison(batch: dict, step: int) -> dict:
        if step % spec.every != spec.every - 1:
            return batch
        n, out = spec.pad, dict(batch)
        for key, value in (
            ("input_ids", pad_token_id),
            ("attention_mask", 0),
            ("labels", -100),
            ("mm_token_type_ids", 0),
        ):
            if key in batch:
                t = batch[key]
                pads = t.new_full((t.shape[0], n), value)
                left = torch.cat([pads[:1], t[:1]], dim=1)
                right = torch.cat([t[1:], pads[1:]], dim=1)
                out[key] = torch.cat([left, right], dim=0)
        return out

    return poison
