"""The regime in the record: relative update size, attention logit and entropy per tower."""

from __future__ import annotations

import statistics

import pytest

from helpers import spec
from nanlab.diagnosis.regime import FIELDS, tower_of
from nanlab.model.qwen_vl import build_model
from nanlab.run.runner import run


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    s = spec("precision=fp32", "lr=1e-3", "max_steps=3")
    return s, run(s, tmp_path_factory.mktemp("regime"))


def test_first_update_is_adams_lr_over_the_weight_rms(record):
    """AdamW's first step moves each weight by lr * g / (|g| + eps): by lr where |g| >> eps,
    less where a gradient is tiny or zero (unused embedding rows, some vision weights). So
    each tensor's RMS(dW)/RMS(W) is at most lr / RMS(W), and at most a few tensors fall far
    below it: the median lies between half of and exactly the median of lr / RMS(W)."""
    s, rec = record
    model = build_model(s.model, s.seed)
    for tower in ("vision", "text"):
        expected = statistics.median(
            s.optim.lr / float(p.detach().pow(2).mean().sqrt())
            for n, p in model.named_parameters()
            if p.dim() == 2 and tower_of(n) == tower
        )
        got = getattr(rec, f"rel_update_first_{tower}")
        assert 0.5 * expected <= got <= expected * (1 + 1e-4), (tower, got, expected)


def test_every_regime_field_is_measured_at_first_and_last_step(record):
    _, rec = record
    assert rec.status in ("ok", "stalled"), rec.verdict()
    for field in FIELDS:
        value = getattr(rec, field)
        assert value is not None and value >= 0, field
    # the last step's update is the cosine schedule's last, smaller lr
    assert rec.rel_update_last_text < rec.rel_update_first_text


def test_a_run_that_stops_early_has_no_last_step(tmp_path):
    rec = run(
        spec("stress=logit_growth", "precision=bf16", "softmax=naive", "lr_x=1", "max_steps=5"),
        tmp_path,
    )
    assert rec.status == "nonfinite" and rec.first_bad_step < 4, rec.verdict()
    assert rec.rel_update_last_text is None and rec.attn_entropy_last_text is None
