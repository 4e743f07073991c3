"""The test-time symptom (nanlab/run/serve.py): a run that trains finite is served on its test split,
batched with left padding; exactly the padded samples break under the mechanism, and the
fixing setting keeps them finite. The probe on the saved checkpoint says the same."""

from __future__ import annotations

import dataclasses

import pytest

from nanlab.config.compose import compose_spec
from nanlab.data.datamodule import Collator, shapes_splits
from nanlab.model.processing import load_processor
from nanlab.probe import ProbeSpec, probe
from nanlab.run.runner import run
from nanlab.run.serve import ServeSpec, verdict

BASE = [
    "experiment=nan_map_base",
    "logger=none",
    "max_steps=4",
    "stress=serving_masked_rows",
    "precision=bf16",
    "softmax=stable",
    "lr_x=1",
    "serve.precision=bf16_autocast",
]


def padded_test_ids(spec) -> set[str]:
    """Independently of the scan: the test samples that get left padding in their batch."""
    samples = shapes_splits(spec.data, spec.seed)["test"]
    processor = load_processor(spec.data.processor_spec())
    ids = set()
    for start in range(0, len(samples), spec.serve.batch_size):
        chunk = samples[start : start + spec.serve.batch_size]
        batch = Collator(processor, "left")(chunk)
        ids |= {s["id"] for s, m in zip(chunk, batch["attention_mask"]) if (m == 0).any()}
    return ids


@pytest.mark.slow
def test_finite_in_training_nonfinite_at_test_on_exactly_the_padded_samples(tmp_path):
    spec = compose_spec(*BASE, "save.hf=true")
    rec = run(spec, tmp_path / "base")
    assert rec.status in ("ok", "stalled"), rec.verdict()  # training stayed finite
    assert rec.test_status == "nonfinite" and rec.test_cause == "masked_row", rec.verdict()
    padded = padded_test_ids(spec)
    assert 0 < len(padded) < rec.test_samples
    assert set(rec.test_failing_ids) == padded
    assert all(p > 0 for p in rec.test_failing_pads)
    assert rec.test_module == "model.language_model.layers.0.self_attn"
    assert "Test time:" in rec.verdict() and "NON-FINITE" in rec.verdict()

    # the fixing settings, each alone
    for fix in ("serve.padding_side=right", "softmax=sdpa", "serve.precision=bf16"):
        fixed = run(compose_spec(*BASE, fix), tmp_path / fix.replace("=", "_"))
        assert fixed.test_status == "finite", (fix, fixed.verdict())

    # the probe on the saved checkpoint, under the same serving conditions, agrees
    served = dataclasses.replace(spec.data, padding_side="left")
    table = probe(
        ProbeSpec(
            checkpoint=str(tmp_path / "base" / "hf"),
            data=served,
            precision=spec.precision,
            softmax=spec.softmax,
            split="test",
            batch_size=spec.serve.batch_size,
            seed=spec.seed,
        ),
        quiet=True,
    )
    assert set(table.loc[table["nonfinite"], "id"]) == padded


def test_verdict_line_names_samples_cause_and_serving():
    line = verdict(
        {
            "test_status": "nonfinite",
            "test_samples": 8,
            "test_nonfinite": 2,
            "test_failing_ids": ["a", "b"],
            "test_module": "m",
            "test_cause": "masked_row",
            "test_cause_detail": "2 rows",
            "test_precision": "bf16_autocast",
            "test_padding_side": "left",
        }
    )
    assert line.startswith("TEST-TIME NON-FINITE: 2 of 8") and "a, b" in line
    assert "masked_row" in line and "bf16_autocast" in line


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("precision", "int8", "serve.precision=int8: allowed bf16, fp16, fp32, bf16_autocast"),
        ("padding_side", "middle", "serve.padding_side=middle: allowed left, right"),
    ],
)
def test_bad_serving_settings_are_one_line_errors(key, value, message):
    with pytest.raises(ValueError, match=message):
        ServeSpec(**{key: value}).check()
    with pytest.raises(ValueError, match=message):
        compose_spec(f"serve.{key}={value}")
