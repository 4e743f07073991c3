"""The advice the map tests, as data: id -> what it says and what it addresses.

The mechanism YAMLs (conf/stress/*.yaml) name advice by these ids in their predictions; the
report shows the seed's list first, in its order, then the advice beyond the seed. An id not
listed here is shown as the id itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Advice:
    id: str
    text: str  # the advice as the seed (or the literature) words it
    addresses: str  # what it is supposed to prevent
    note: str = ""  # what the report adds to it
    seed: bool = True  # one of the seed's pieces of advice


ADVICE: dict[str, Advice] = {
    a.id: a
    for a in (
        Advice(
            "use_fp32",
            "use fp32",
            "overflow and rounding of half precision (the seed: bf16 has a smaller range)",
        ),
        Advice(
            "max_subtracted_softmax",
            "use a max-subtracted (stable) softmax",
            "exp() overflow in the attention softmax",
            note="torch.softmax and transformers' eager attention already subtract the row "
            "max, so the seed's stable_softmax computes what they compute",
        ),
        Advice(
            "lower_lr",
            "lower the learning rate",
            "updates too large: logit growth, loss spikes, divergence",
        ),
        Advice("warmup", "add warmup", "large updates early in training"),
        Advice("clip", "clip gradients more", "gradient spikes"),
        Advice("normalize_inputs", "check and normalize inputs", "inputs out of range"),
        Advice(
            "progressive",
            "start in fp32, then switch to bf16",
            "instability of the first steps in half precision",
        ),
        Advice(
            "monitor",
            "monitor stability",
            "finding where and why a run went non-finite",
            note="the map's evidence is the cause the monitor named for each failing run",
        ),
        Advice(
            "guard_key_nodes",
            "protect key nodes (skip_step, clamp)",
            "a non-finite value in a key node reaching the weights",
            note="guard=skip_step skips steps with non-finite gradients; guard=clamp clamps "
            "half-precision hidden states (as vLLM does)",
        ),
        Advice(
            "bf16_over_fp16", "use bf16 rather than fp16", "fp16's range (max 65,504)", seed=False
        ),
        Advice(
            "safe_softmax",
            "use a softmax that gives fully masked rows 0",
            "fully masked query rows (0/0)",
            seed=False,
        ),
        Advice(
            "right_padding", "pad on the right", "fully masked pad rows of left padding", seed=False
        ),
        Advice(
            "transformers_mask",
            "build the mask as transformers does",
            "-inf from summed mask planes",
            seed=False,
        ),
        Advice(
            "serve_precision",
            "serve in bf16 weights or fp32, not under bf16 autocast with a half-precision mask",
            "fully masked rows at test time: the fp32 mask's float-min cast to -inf in "
            "half-precision scores",
            seed=False,
        ),
        Advice(
            "fp32_qk",
            "compute q.k, the mask and the softmax in fp32",
            "attention scores past the half-precision range, -inf from a cast mask",
            note="softmax=fp32_qk upcasts q and k before the product (transformers PR 33317); "
            "eager's q.k runs in the compute dtype",
            seed=False,
        ),
        Advice(
            "qk_norm",
            "normalize queries and keys (QK-norm)",
            "attention-logit growth",
            note="an architecture change: per-head RMS norm of q and k (model.qk_norm)",
            seed=False,
        ),
        Advice(
            "z_loss", "add a z-loss", "output-logit drift (log Z of the output softmax)", seed=False
        ),
        Advice(
            "update_clipping",
            "clip the update (StableAdamW)",
            "updates larger than Adam's second moment predicts",
            seed=False,
        ),
        Advice(
            "adam_eps_beta2",
            "a larger Adam eps and a smaller beta2",
            "a stale second moment after a sudden gradient change",
            seed=False,
        ),
        Advice(
            "keep_targets",
            "keep the supervised tokens (no truncation past the answer)",
            "batches without a supervised token (0/0 loss)",
            seed=False,
        ),
    )
}


# An LR-sensitivity family's override -> the advice id it tests (nanlab/report/sensitivity.py):
# (key, value, id); value "*": any value, ">0": a positive number, else that value.
MITIGATION_ADVICE: tuple[tuple[str, object, str], ...] = (
    ("warmup_steps", ">0", "warmup"),
    ("clip", ">0", "clip"),
    ("softmax", "stable", "max_subtracted_softmax"),
    ("guard", "skip_step", "guard_key_nodes"),
    ("guard", "clamp", "guard_key_nodes"),
    ("optim.z_loss", ">0", "z_loss"),
    ("model.qk_norm", True, "qk_norm"),
    ("optim.name", "stable_adamw", "update_clipping"),
    ("optim.eps", "*", "adam_eps_beta2"),
    ("optim.betas", "*", "adam_eps_beta2"),
    ("softmax", "fp32_qk", "fp32_qk"),
    ("softmax", "safe", "safe_softmax"),
)


def advice_for(key: str, value: str) -> str | None:
    """The advice id an override ('optim.z_loss', '0.0001') tests, from MITIGATION_ADVICE."""
    import yaml

    from .match import same_value

    try:
        v = yaml.safe_load(value)
    except yaml.YAMLError:
        v = value
    for k, want, id_ in MITIGATION_ADVICE:
        if k != key:
            continue
        if want == "*":
            return id_
        if want == ">0":
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
                return id_
        elif same_value(v, want):
            return id_
    return None


def advice(id_: str) -> Advice:
    return ADVICE.get(id_) or Advice(id_, id_, "(unknown advice id)", seed=False)


def ordered(ids) -> list[str]:
    """The seed's advice first (its order), then the rest known, then unknown ids."""
    ids = set(ids)
    known = [a for a in ADVICE if a in ids]
    return known + sorted(ids - set(ADVICE))


# --- the seed's claim that bf16 has a smaller range than fp32 -------------------------------

FP32_MAX = (2 - 2**-23) * 2.0**127
BF16_MAX = (2 - 2**-7) * 2.0**127
FP16_MAX = 65504.0
EXP_LIMIT = {"fp32": math.log(FP32_MAX), "bf16": math.log(BF16_MAX), "fp16": math.log(FP16_MAX)}


def range_facts() -> str:
    return (
        f"bf16 and fp32 both have 8 exponent bits (largest finite value {BF16_MAX:.3g} vs "
        f"{FP32_MAX:.3g}): exp(x) overflows past x = {EXP_LIMIT['bf16']:.2f} in bf16 and "
        f"{EXP_LIMIT['fp32']:.2f} in fp32, but past {EXP_LIMIT['fp16']:.2f} in fp16 "
        f"(5 exponent bits, max {FP16_MAX:,.0f}). bf16 has fewer mantissa bits (8 vs 24), "
        "not a smaller range."
    )
