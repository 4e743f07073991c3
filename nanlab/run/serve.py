"""The test-time symptom: a fine-tuned model served batched, with left padding, in bf16 (or
fp16, fp32), and which test samples come out non-finite, where, and why.

Users meet the failure after training "went fine": some test samples give NaN attention at
inference. `serve_test` runs at the end of every run that stayed finite (train.py) and
`python -m src.probe` runs the same row scan on any checkpoint. Each sample is run alone
with the padding it had in the batch, under the monitor's hooks, so the first non-finite
module and its cause (causes.py) belong to that sample.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from typing import Any

import torch

from nanlab.config.specs import SERVE_PRECISIONS, ServeSpec
from nanlab.record import short

IGNORE_INDEX = -100
# name -> (the weights' dtype, the autocast dtype or None)
SERVE_DTYPES = {
    "bf16": (torch.bfloat16, None),  # from_pretrained(torch_dtype=torch.bfloat16)
    "fp16": (torch.float16, None),  # from_pretrained(torch_dtype=torch.float16)
    "fp32": (torch.float32, None),
    "bf16_autocast": (torch.float32, torch.bfloat16),  # fp32 weights under bf16 autocast: a
    #                    bf16-mixed Trainer's validation/test step, or autocast inference
}
assert tuple(SERVE_DTYPES) == SERVE_PRECISIONS, "specs.SERVE_PRECISIONS names these"
LAYER = re.compile(r"(language_model\.layers|visual\.blocks)\.(\d+)")
PARTS = {
    "self_attn": "attention",
    "attn": "attention",
    "mlp": "mlp",
    "merger": "merger",
    "embed_tokens": "embedding",
    "patch_embed": "patch_embed",
    "lm_head": "lm_head",
    "norm": "norm",
    "input_layernorm": "norm",
    "post_attention_layernorm": "norm",
    "norm1": "norm",
    "norm2": "norm",
}


def serve_test(
    model, processor, samples: list[dict], spec: ServeSpec, data_spec, half_gemm: str = "native"
) -> dict:
    """Cast the trained model to the serving dtype (in place: the run is over), collate the
    test samples in batches with the serving padding, and scan every row. Returns the
    record's test_* fields."""
    from nanlab.data.datamodule import Collator
    from nanlab.diagnosis.attention_stats import AttentionStats
    from nanlab.numerics.precision import Fp32AccumulatedHalfGemm

    started = time.time()
    dtype, autocast = SERVE_DTYPES[spec.precision]
    model.eval().to(dtype)
    collate = Collator.for_data(processor, data_spec, padding_side=spec.padding_side)
    half = (dtype != torch.float32 or autocast is not None) and half_gemm == "fp32_accumulate"
    device = next(model.parameters()).device.type

    @contextlib.contextmanager
    def context():
        with (
            Fp32AccumulatedHalfGemm() if half else contextlib.nullcontext(),
            torch.autocast(device, dtype=autocast or torch.float32, enabled=autocast is not None),
        ):
            yield

    config = model.config
    stats = AttentionStats(model)
    rows = []
    with torch.no_grad():
        for start in range(0, len(samples), spec.batch_size):
            batch = collate(samples[start : start + spec.batch_size])
            batch["pixel_values"] = batch["pixel_values"].to(dtype)
            split = split_rows(
                batch, config.image_token_id, config.vision_config.spatial_merge_size
            )
            if batch_finite(model, context, batch):
                # the batch as served stayed finite: no row can have failed in it
                rows += [{"id": r["sample_ids"][0], "nonfinite": False} for r in split]
                continue
            for row in split:  # attribute: each row alone, with its padding, under hooks
                rows.append(
                    {
                        "id": row["sample_ids"][0],
                        "num_pad": int((row["attention_mask"][0] == 0).sum()),
                        **scan_row(model, context, stats, row),
                    }
                )
    return summarize(rows, spec.precision, spec.padding_side, time.time() - started)


def batch_finite(model, context, batch: dict) -> bool:
    """The batched forward, with a check on every attention's weights and the logits."""
    from nanlab.numerics import attention

    bad: list[bool] = []

    def watch(module, query, key, mask, scaling, weights, out):
        if not bad and not torch.isfinite(weights if weights is not None else out).all():
            bad.append(True)

    inputs = {k: v for k, v in batch.items() if k not in ("labels", "sample_ids")}
    attention.OBSERVERS.append(watch)
    try:
        with context():
            logits = model(**inputs, use_cache=False).logits
    finally:
        attention.OBSERVERS.remove(watch)
    return not bad and bool(torch.isfinite(logits).all())


def summarize(rows: list[dict], precision: str, padding_side: str, seconds: float) -> dict:
    failing = [r for r in rows if r["nonfinite"]]
    first = failing[0] if failing else {}
    return {
        "test_status": "nonfinite" if failing else "finite",
        "test_samples": len(rows),
        "test_nonfinite": len(failing),
        "test_failing_ids": [r["id"] for r in failing],
        "test_failing_pads": [r["num_pad"] for r in failing],
        "test_module": first.get("first_module"),
        "test_cause": first.get("cause"),
        "test_cause_detail": first.get("cause_detail"),
        "test_precision": precision,
        "test_padding_side": padding_side,
        "test_wall_s": round(seconds, 3),
    }


def verdict(test: dict) -> str:
    """One line: the test-time outcome, as the record and the probe print it, ending with
    what the committed map measured as fixes for its cause."""
    from nanlab.integrations.fixes import fix_line

    where = f"served {test['test_precision']}, {test['test_padding_side']} padding"
    if test["test_status"] == "finite":
        return f"TEST-TIME FINITE: all {test['test_samples']} test samples finite ({where})."
    ids = ", ".join(test["test_failing_ids"][:8]) + (
        ", ..." if len(test["test_failing_ids"]) > 8 else ""
    )
    return (
        f"TEST-TIME NON-FINITE: {test['test_nonfinite']} of {test['test_samples']} test "
        f"samples non-finite ({where}): {ids}; first in {test['test_module']}, cause "
        f"{test['test_cause']}"
        + (f" ({test['test_cause_detail']})" if test.get("test_cause_detail") else "")
        + "."
        + fix_line(test["test_cause"], "test")
    )


def split_rows(batch: dict, image_token_id: int, merge: int) -> list[dict]:
    """Each row of a collated batch as a batch of one: its padded token rows, and the patches
    and grid rows of its own images (images are in row order, see data.Collator)."""
    import torch

    if "pixel_values_videos" in batch:
        raise ValueError("probe: video inputs are not supported")
    ids = batch["input_ids"]
    b = ids.shape[0]
    grid: Any = batch.get("image_grid_thw")
    pixels: Any = batch.get("pixel_values")
    per_row_tokens = (ids == image_token_id).sum(1).tolist()
    spans, image, patch = [], 0, 0
    for i in range(b):
        first_image, first_patch, tokens = image, patch, 0
        while tokens < per_row_tokens[i]:
            n = int(grid[image].prod())
            tokens += n // merge**2
            patch += n
            image += 1
        if tokens != per_row_tokens[i]:
            raise ValueError(f"row {i}: {per_row_tokens[i]} image tokens do not match its images")
        spans.append((first_image, image, first_patch, patch))
    rows = []
    for i, (i0, i1, p0, p1) in enumerate(spans):
        row: dict[str, Any] = {
            k: v[i : i + 1]
            for k, v in batch.items()
            if isinstance(v, torch.Tensor)
            and k not in ("pixel_values", "image_grid_thw")
            and v.dim() > 0
            and v.shape[0] == b
        }
        if i1 > i0:
            row["pixel_values"] = pixels[p0:p1]
            row["image_grid_thw"] = grid[i0:i1]
        row["sample_ids"] = [batch["sample_ids"][i]]
        rows.append(row)
    return rows


def properties(row: dict, padding_side: str, merge: int) -> dict:
    """What may matter about a sample, as the model saw it."""
    import torch

    mask = row["attention_mask"][0]
    length, real = int(mask.numel()), int(mask.sum())
    pixels = row.get("pixel_values")
    grid = row.get("image_grid_thw")
    return {
        "id": row["sample_ids"][0],
        "seq_len": real,
        "padded_len": length,
        "num_pad": length - real,
        "padding_side": padding_side,
        "n_images": 0 if grid is None else int(grid.shape[0]),
        "n_image_tokens": 0 if grid is None else int(grid.prod(-1).sum()) // merge**2,
        "pixel_min": math.nan if pixels is None else float(pixels.float().min()),
        "pixel_max": math.nan if pixels is None else float(pixels.float().max()),
        "pixels_nonfinite": bool(pixels is not None and not torch.isfinite(pixels).all()),
        "n_supervised": int((row["labels"][0] != IGNORE_INDEX).sum()),
    }


# --- where it broke ---------------------------------------------------------------------


def locate(name: str | None) -> dict:
    """A module name as tower / layer / part, e.g. model.language_model.layers.0.self_attn ->
    text, 0, attention."""
    if name is None:
        return {"first_tower": None, "first_layer": None, "first_part": None}
    m = LAYER.search(name)
    tower = (
        "vision"
        if ".visual." in f".{name}"
        else "lm_head"
        if name.startswith("lm_head")
        else "text"
    )
    names = (name[m.end() :] if m else name).strip(".").split(".")
    part = next((PARTS[n] for n in names if n in PARTS), names[-1] if m is None else "block")
    return {"first_tower": tower, "first_layer": int(m.group(2)) if m else None, "first_part": part}


def nonfinite(t) -> bool:
    import torch

    return bool(t.is_floating_point() and not torch.isfinite(t).all())


def _sample_loss(logits, labels) -> float:
    import torch.nn.functional as F

    targets = labels[:, 1:]
    if not (targets != IGNORE_INDEX).any():
        return math.nan
    return float(
        F.cross_entropy(
            logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX
        )
    )


def scan_row(model, context, stats, row: dict) -> dict:
    """One row alone under the monitor's hooks (`context()`: the precision it runs in):
    where it went non-finite and why, its largest attention logit, its loss."""
    from nanlab.diagnosis.locate import first_nonfinite_forward

    inputs = {k: v for k, v in row.items() if k not in ("labels", "sample_ids")}

    def forward():
        with context():
            return model(**inputs, use_cache=False)

    why: list = []
    out: Any
    with stats.active():
        name, dtype, out = first_nonfinite_forward(model, forward, why, row.get("sample_ids"))
    summary = stats.summary()
    top = max(summary.items(), key=lambda kv: kv[1]["max_logit"], default=None)
    logits_bad = nonfinite(out.logits)
    return {
        "nonfinite": name is not None or logits_bad,
        "first_module": name,
        **locate(name),
        "first_dtype": dtype,
        "attn_nonfinite": int(sum(s["nonfinite"] for s in summary.values())),
        "max_attn_logit": top[1]["max_logit"] if top else math.nan,
        "max_attn_logit_layer": short(top[0]) if top else None,
        "logits_nonfinite": logits_bad,
        "loss": _sample_loss(out.logits, row["labels"]),
        "cause": (next((w for w in why if w), None) or ("unknown",))[0] if name else None,
        "cause_detail": (next((w for w in why if w), None) or (None, None))[1] if name else None,
    }
