"""Why a value went non-finite: the evidence the monitor records with the first bad value.

Each function looks at one place where a non-finite value can be born and returns
(cause, detail, value) or None. The tags are record.CAUSES; `unknown` is what the monitor
records when none of these fits (counted, never guessed).
"""

from __future__ import annotations

import math

import torch

from nanlab.numerics import attention


def ln_max(dtype: torch.dtype) -> float:
    """exp() overflows past this: 88.72 in fp32 and bf16 (same 8 exponent bits), 11.09 in fp16."""
    return math.log(torch.finfo(dtype).max)


def ln_min(dtype: torch.dtype) -> float:
    """exp() of anything below this is 0 (the smallest subnormal): -103.3 in fp32."""
    info = torch.finfo(dtype)
    return math.log(info.smallest_normal * info.eps)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def attention_cause(query, key, mask, scaling, weights, out, num_groups: int, sample_ids=None):
    """A softmax that produced non-finite weights (or outputs): a query row with every key
    masked, or an exp() argument past ln(max) of the dtype the softmax ran in."""
    watched = weights if weights is not None else out
    if watched is None or torch.isfinite(watched).all():
        return None
    with torch.no_grad():
        k = attention.repeat_kv(key, num_groups)
        logits = torch.matmul(query.float(), k.float().transpose(2, 3)) * scaling
        masked = attention._masked(mask)
        bad_rows = ~torch.isfinite(watched).all(-1) if watched.dim() == 4 else None
        if masked is not None and bad_rows is not None:
            full = masked[..., : logits.shape[-1]].all(-1).expand_as(bad_rows)
            if (bad_rows & full).any():
                b = int((bad_rows & full).nonzero()[0, 0])
                who = sample_ids[b] if sample_ids is not None and b < len(sample_ids) else b
                n = int(full[b].any(0).sum())
                detail = (
                    f"{n} query rows of sample {who} have every key masked "
                    f"(mask {_name(mask.dtype)}, min {float(mask.min()):.3g})"
                )
                return ("masked_row", detail, float(n))
            logits = logits.masked_fill(masked[..., : logits.shape[-1]], float("-inf"))
        finite = logits[torch.isfinite(logits)]
        top = float(finite.max()) if finite.numel() else math.nan
        dtype = attention.compute_dtype(query)
        if top > ln_max(dtype):
            detail = f"softmax input {top:.1f} > ln(max {_name(dtype)}) {ln_max(dtype):.2f}"
            return ("exp_overflow", detail, top)
        # the other side of exp/sum without max subtraction: a row whose every exp()
        # underflows to 0 gives 0/0
        row_max = logits.amax(-1)
        row_max = row_max[torch.isfinite(row_max)]
        low = ln_min(dtype)
        if row_max.numel() and float(row_max.min()) < low:
            lowest = float(row_max.min())
            detail = (
                f"a softmax row's largest input {lowest:.1f} < ln(smallest "
                f"{_name(dtype)}) {low:.1f}: every exp() is 0, 0/0"
            )
            return ("exp_underflow", detail, lowest)
    return None


def module_cause(inputs, output, dtype: torch.dtype):
    """A module whose output holds inf from finite inputs, in half precision: the value
    passed the dtype's max inside it (a matmul, a convolution, an add)."""
    outs = [t for t in _floats(output) if not torch.isfinite(t).all()]
    if not outs or dtype not in (torch.float16, torch.bfloat16):
        return None
    if any(torch.isnan(t).any() for t in outs) and not any(torch.isinf(t).any() for t in outs):
        return None
    ins = list(_floats(inputs))
    if any(not torch.isfinite(t).all() for t in ins):
        return None
    big = max((float(t.abs().max()) for t in ins if t.numel()), default=math.nan)
    detail = (
        f"output past max {_name(dtype)} {torch.finfo(dtype).max:.6g} (inf) from "
        f"finite inputs (largest |input| {big:.4g})"
    )
    return ("half_overflow", detail, big)


def input_cause(batch: dict):
    for key, t in batch.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            return ("nonfinite_input", f"batch['{key}'] holds non-finite values", None)
    return None


def empty_targets_cause(batch: dict):
    """The mean loss over zero supervised tokens is 0/0 = NaN (the gradients are zero)."""
    labels = batch.get("labels")
    if labels is None or (labels[:, 1:] != -100).any():
        return None
    ids = batch.get("sample_ids") or list(range(labels.shape[0]))
    return (
        "empty_targets",
        f"no supervised token in the batch (samples {', '.join(map(str, ids))})",
        0.0,
    )


def tensors(x):
    """Every tensor in a module's inputs or outputs (tuples, lists, dicts, ModelOutputs)."""
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (tuple, list)):
        for y in x:
            yield from tensors(y)
    elif isinstance(x, dict) or hasattr(x, "values"):
        for y in x.values():
            yield from tensors(y)


def _floats(x):
    return (t for t in tensors(x) if t.is_floating_point())
