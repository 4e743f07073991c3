"""The regime the map trained in, in dimensionless numbers (records' regime section, written
by nanlab/diagnosis/regime.py): is it a fine-tuning world? The numbers only; the calibration
to a real fine-tune is issue 19's."""

from __future__ import annotations

import math

import pandas as pd

# AdamW's first step moves each weight by about lr: relative update ~ lr / RMS(W). Qwen2.5's
# initializer_range is 0.02; a pretrained 3B model's own weight RMS is not measured here.
REFERENCE_LR, REFERENCE_RMS = 1e-5, 0.02
COLUMNS = (
    "rel_update_first_text",
    "rel_update_first_vision",
    "attn_max_logit_last_text",
    "attn_max_logit_last_vision",
    "attn_entropy_last_text",
    "attn_entropy_last_vision",
)


def _median(values) -> str:
    v = [float(x) for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return f"{pd.Series(v).median():.3g}" if v else "-"


def regime_section(df: pd.DataFrame) -> list[str]:
    have = [c for c in COLUMNS if c in df.columns]
    if not have or df[have].isna().all().all():
        return []
    finite = df[(df["stress"] == "none") & df["status"].isin(("ok", "stalled"))]
    if finite.empty:
        return []
    L = [
        "## The regime (dimensionless)",
        "",
        (
            "Runs without a planted mechanism that stayed finite (ok or stalled), by `lr_x`: the "
            "median over runs of the relative update size at step 0 (RMS(dW)/RMS(W), the median "
            "over each tower's 2-D weights), and at the last step the largest attention logit "
            "and the mean attention entropy (nats) per tower. For scale: AdamW's first step moves "
            f"a weight by about lr, so lr={REFERENCE_LR:g} on weights of RMS {REFERENCE_RMS:g} "
            "(Qwen2.5's initializer_range; a pretrained model's RMS is not measured here) is a "
            f"relative update of about {REFERENCE_LR / REFERENCE_RMS:.0e}. Where the tiny map's "
            "update is orders of magnitude larger, or its attention ends near one-hot (entropy "
            "near 0, logits in the thousands) in runs that count as ok, the map is not measuring "
            "a fine-tuning regime: issue 19 calibrates it."
        ),
        "",
    ]
    head = [
        "lr_x",
        "runs",
        "ok",
        "rel. update step 0 (text / vision)",
        "max logit, last step (text / vision)",
        "entropy, last step (text / vision)",
    ]
    L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for lr_x, g in sorted(finite.groupby("lr_x"), key=lambda kv: float(kv[0])):
        L.append(
            f"| {float(lr_x):g} | {len(g)} | {int((g['status'] == 'ok').sum())} | "
            f"{_median(g.get('rel_update_first_text', []))} / "
            f"{_median(g.get('rel_update_first_vision', []))} | "
            f"{_median(g.get('attn_max_logit_last_text', []))} / "
            f"{_median(g.get('attn_max_logit_last_vision', []))} | "
            f"{_median(g.get('attn_entropy_last_text', []))} / "
            f"{_median(g.get('attn_entropy_last_vision', []))} |"
        )
    return [*L, ""]
