"""Issue 9's verdict rules, each pinned on constructed records (nanlab.record.Record through
write_record), read back by src.report as a cluster's results would be.

Expected values come from the construction (the outcomes each cell's seeds were given), not
from the engine.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_report_builders import (
    cfg,
    failing,
    mech,
    ok,
    pred,
    seeds,
    stalled,
)

from nanlab import report

CAUSE = "exp_overflow"
BASELINE = ["precision=bf16", "softmax=naive", "lr_x=10"]


def analyze(root: Path) -> report.Analysis:
    return report.analyze(report.collect(root))


def the(a: report.Analysis, name: str) -> report.Mechanism:
    [m] = [m for m in a.mechanisms if m.name == name]
    return m


def pair(m: report.Mechanism, arm: str) -> report.Pair:
    [p] = [p for p in m.pairs if p.arm == arm]
    return p


def line(a: report.Analysis, advice_id: str) -> str:
    [ln] = [x for x in a.advice if x.id == advice_id]
    return ln.line


# --------------------------------------------------------------------------- agreement


def test_refutes_only_for_predicted_fixes(tmp_path):
    """Every (predicted, measured) combination the construction produces, once."""
    spec = mech(
        "toy",
        CAUSE,
        BASELINE,
        [
            pred("max_subtracted_softmax", ["softmax=stable"], "fixes"),  # fixes: agrees
            pred("use_fp32", ["precision=fp32"], "fixes"),  # no_effect
            pred("warmup", ["warmup_steps=10"], "fixes"),  # worsens (sooner)
            pred("guard_key_nodes", ["guard=skip_step"], "fixes"),  # stalls
            pred("lower_lr", ["lr_x=1"], "fixes"),  # mixed
            pred("clip", ["clip=0.1"], "delays"),  # no_effect
            pred("safe_softmax", ["softmax=safe"], "no_effect"),  # fixes
        ],
    )
    seeds(tmp_path, cfg(spec), failing(3, 10, CAUSE))
    seeds(tmp_path, cfg(spec, "softmax=stable"), ok(3))
    seeds(tmp_path, cfg(spec, "precision=fp32"), failing(3, 10, CAUSE))
    seeds(tmp_path, cfg(spec, "warmup_steps=10"), failing(3, 4, CAUSE))
    seeds(tmp_path, cfg(spec, "guard=skip_step"), stalled(3))
    seeds(tmp_path, cfg(spec, "lr_x=1"), ok(1) + stalled(1) + failing(1, 12, CAUSE))
    seeds(tmp_path, cfg(spec, "clip=0.1"), failing(3, 11, CAUSE))
    seeds(tmp_path, cfg(spec, "softmax=safe"), ok(3))
    m = the(analyze(tmp_path), "toy")
    assert m.counts
    got = {p.arm: (p.measured, p.agreement) for p in m.pairs}
    assert got == {
        "softmax=stable": ("fixes", "agrees"),
        "precision=fp32": ("no_effect", "refutes"),
        "warmup_steps=10": ("worsens", "refutes"),
        "guard=skip_step": ("stalls", "refutes"),
        "lr_x=1": ("mixed", "disagrees"),
        "clip=0.1": ("no_effect", "disagrees"),
        "softmax=safe": ("fixes", "disagrees"),
    }


def test_advice_out_of_scope_is_never_refuted(tmp_path):
    """`clip` predicted no_effect on two mechanisms; whatever it does there, no "refutes"."""
    for name, clip_outcome in (
        ("toy_a", failing(3, 10, CAUSE)),  # no effect: agrees
        ("toy_b", failing(3, 3, CAUSE, 0.9)),
    ):  # worsens: disagrees
        spec = mech(
            name,
            CAUSE,
            BASELINE,
            [
                pred("max_subtracted_softmax", ["softmax=stable"], "fixes"),
                pred("clip", ["clip=0.1"], "no_effect"),
            ],
        )
        seeds(tmp_path, cfg(spec), failing(3, 10, CAUSE, 0.1))
        seeds(tmp_path, cfg(spec, "softmax=stable"), ok(3))
        seeds(tmp_path, cfg(spec, "clip=0.1"), clip_outcome)
    a = analyze(tmp_path)
    clips = [pair(the(a, n), "clip=0.1") for n in ("toy_a", "toy_b")]
    assert [(p.measured, p.agreement) for p in clips] == [
        ("no_effect", "agrees"),
        ("worsens", "disagrees"),
    ]
    text = line(a, "clip")
    assert "refute" not in text
    assert "out of scope for toy_a" in text and "disagrees on toy_b" in text
    assert "predicted no_effect, measured worsens" in text


def test_equal_bad_pairs_are_treated_alike_for_every_advice(tmp_path):
    """Five advice ids whose mitigation cells fail exactly like the baseline: the same
    measured effect for all; the agreement follows the prediction only."""
    arms = {
        "use_fp32": "precision=fp32",
        "lower_lr": "lr_x=1",
        "clip": "clip=0.1",
        "warmup": "warmup_steps=10",
        "guard_key_nodes": "guard=skip_step",
    }
    predicted = {
        "use_fp32": "no_effect",
        "lower_lr": "fixes",
        "clip": "delays",
        "warmup": "no_effect",
        "guard_key_nodes": "fixes",
    }
    spec = mech(
        "toy",
        CAUSE,
        BASELINE,
        [pred("max_subtracted_softmax", ["softmax=stable"], "fixes")]
        + [pred(a, [o], predicted[a]) for a, o in arms.items()],
    )
    seeds(tmp_path, cfg(spec), failing(3, 10, CAUSE, 0.2))
    seeds(tmp_path, cfg(spec, "softmax=stable"), ok(3))
    for o in arms.values():
        seeds(tmp_path, cfg(spec, o), failing(3, 10, CAUSE, 0.2))
    m = the(analyze(tmp_path), "toy")
    want = {"no_effect": "agrees", "fixes": "refutes", "delays": "disagrees"}
    for a, o in arms.items():
        p = pair(m, o)
        assert (p.measured, p.agreement) == ("no_effect", want[predicted[a]]), a
        assert "10 -> 10" in p.detail


# --------------------------------------------------------------------------- gates


def test_progressive_switch_after_the_failure_is_excluded(tmp_path):
    spec = mech(
        "toy",
        CAUSE,
        BASELINE,
        [
            pred("max_subtracted_softmax", ["softmax=stable"], "fixes"),
            pred(
                "progressive",
                ["precision=progressive", "precision.switch_step=2"],
                "no_effect",
                acts_at="precision.switch_step",
            ),
            pred(
                "progressive",
                ["precision=progressive", "precision.switch_step=20"],
                "no_effect",
                acts_at="precision.switch_step",
            ),
        ],
    )
    seeds(tmp_path, cfg(spec), failing(3, 8, CAUSE))
    seeds(tmp_path, cfg(spec, "softmax=stable"), ok(3))
    seeds(
        tmp_path,
        cfg(spec, "precision=progressive", "precision.switch_step=2"),
        failing(3, 8, CAUSE),
    )
    seeds(tmp_path, cfg(spec, "precision=progressive", "precision.switch_step=20"), ok(3))
    a = analyze(tmp_path)
    m = the(a, "toy")
    early = pair(m, "precision=progressive precision.switch_step=2")
    late = pair(m, "precision=progressive precision.switch_step=20")
    assert early.counts and (early.measured, early.agreement) == ("no_effect", "agrees")
    assert not late.counts and late.measured is None and late.agreement is None
    assert late.status == "excluded: acted at step 20, after the baseline failed at step 8"
    text = line(a, "progressive")
    assert text == (
        "out of scope for toy (precision=progressive precision.switch_step=2: "
        "0/3 seeds ok, first bad step 8 -> 8); not counted: toy "
        "[precision=progressive precision.switch_step=20] (excluded: acted at "
        "step 20, after the baseline failed at step 8)"
    )


def test_switch_at_the_failure_step_is_excluded_too(tmp_path):
    spec = mech(
        "toy",
        CAUSE,
        BASELINE,
        [
            pred("max_subtracted_softmax", ["softmax=stable"], "fixes"),
            pred(
                "progressive",
                ["precision=progressive", "precision.switch_step=8"],
                "fixes",
                acts_at="precision.switch_step",
            ),
        ],
    )
    seeds(tmp_path, cfg(spec), failing(3, 8, CAUSE))
    seeds(tmp_path, cfg(spec, "softmax=stable"), ok(3))
    seeds(tmp_path, cfg(spec, "precision=progressive", "precision.switch_step=8"), ok(3))
    p = pair(the(analyze(tmp_path), "toy"), "precision=progressive precision.switch_step=8")
    assert p.status.startswith("excluded: acted at step 8") and not p.counts


@pytest.mark.parametrize("k_with_cause, counts", [(3, True), (2, True), (1, False), (0, False)])
def test_baseline_must_fail_with_the_declared_cause(tmp_path, k_with_cause, counts):
    spec = mech(
        "toy",
        CAUSE,
        BASELINE,
        [
            pred("max_subtracted_softmax", ["softmax=stable"], "fixes"),
            pred("use_fp32", ["precision=fp32"], "no_effect"),
        ],
    )
    seeds(
        tmp_path,
        cfg(spec),
        failing(k_with_cause, 10, CAUSE) + failing(3 - k_with_cause, 10, "masked_row"),
    )
    seeds(tmp_path, cfg(spec, "softmax=stable"), ok(3))
    seeds(tmp_path, cfg(spec, "precision=fp32"), failing(3, 10, CAUSE))
    a = analyze(tmp_path)
    m = the(a, "toy")
    assert m.counts is counts
    if counts:
        assert all(p.counts for p in m.pairs)
        assert "fixes toy" in line(a, "max_subtracted_softmax")
    else:
        reason = f"baseline did not fail with {CAUSE} ({k_with_cause}/3 seeds)"
        assert m.status == reason
        assert all(p.status == reason and not p.counts for p in m.pairs)
        assert all(p.agreement is None for p in m.pairs)
        text = line(a, "max_subtracted_softmax")
        assert text == "not counted: toy (baseline did not fail with its cause)"


def test_baseline_that_stays_finite_does_not_count(tmp_path):
    spec = mech("toy", CAUSE, BASELINE, [pred("clip", ["clip=0.1"], "fixes")])
    seeds(tmp_path, cfg(spec), ok(3))
    seeds(tmp_path, cfg(spec, "clip=0.1"), ok(3))
    m = the(analyze(tmp_path), "toy")
    assert m.status == f"baseline did not fail with {CAUSE} (0/3 seeds)"
    assert pair(m, "clip=0.1").measured is None


def test_failed_positive_control_marks_the_mechanism(tmp_path):
    spec = mech(
        "toy",
        CAUSE,
        BASELINE,
        [
            pred("max_subtracted_softmax", ["softmax=stable"], "fixes"),
            pred("use_fp32", ["precision=fp32"], "no_effect"),
        ],
    )
    seeds(tmp_path, cfg(spec), failing(3, 10, CAUSE))
    seeds(tmp_path, cfg(spec, "softmax=stable"), failing(3, 10, CAUSE))  # the control fails
    seeds(tmp_path, cfg(spec, "precision=fp32"), failing(3, 10, CAUSE))
    a = analyze(tmp_path)
    m = the(a, "toy")
    assert not m.control and not m.counts and m.status == "positive control failed"
    fp32 = pair(m, "precision=fp32")
    assert (fp32.measured, fp32.agreement) == ("no_effect", "agrees")  # shown ...
    assert not fp32.counts and fp32.status == "positive control failed"  # ... not counted
    assert line(a, "use_fp32") == "not counted: toy (positive control failed)"
    md = report.markdown.mechanism_section(m)
    assert any("**positive control failed**" in x for x in md)


def test_too_few_seeds(tmp_path):
    spec = mech(
        "toy",
        CAUSE,
        BASELINE,
        [
            pred("max_subtracted_softmax", ["softmax=stable"], "fixes"),
            pred("use_fp32", ["precision=fp32"], "no_effect"),
        ],
    )
    seeds(tmp_path, cfg(spec), failing(3, 10, CAUSE))
    seeds(tmp_path, cfg(spec, "softmax=stable"), ok(3))
    seeds(tmp_path, cfg(spec, "precision=fp32"), failing(2, 10, CAUSE))
    m = the(analyze(tmp_path), "toy")
    p = pair(m, "precision=fp32")
    assert p.status == "too few seeds (2)" and p.measured is None and not p.counts

    other = tmp_path / "b"
    seeds(other, cfg(spec), failing(2, 10, CAUSE))
    seeds(other, cfg(spec, "softmax=stable"), ok(3))
    m = the(analyze(other), "toy")
    assert m.status == "too few seeds (2) in the baseline" and not m.counts


def test_interrupted_and_error_runs_are_not_seeds(tmp_path):
    spec = mech(
        "toy", CAUSE, BASELINE, [pred("max_subtracted_softmax", ["softmax=stable"], "fixes")]
    )
    seeds(tmp_path, cfg(spec), failing(3, 10, CAUSE))
    seeds(tmp_path, cfg(spec, "softmax=stable"), ok(2) + [("interrupted",), ("error",)])
    m = the(analyze(tmp_path), "toy")
    c = pair(m, "softmax=stable").cell
    assert (c.n_seeds, c.n_interrupted, c.n_error) == (2, 1, 1)
    assert pair(m, "softmax=stable").status == "too few seeds (2)"


# --------------------------------------------------------------------------- effects


def _one(tmp_path, base, mit, predicted="no_effect"):
    spec = mech(
        "toy",
        CAUSE,
        BASELINE,
        [
            pred("max_subtracted_softmax", ["softmax=stable"], "fixes"),
            pred("lower_lr", ["lr_x=1"], predicted),
        ],
    )
    seeds(tmp_path, cfg(spec), base)
    seeds(tmp_path, cfg(spec, "softmax=stable"), ok(3))
    seeds(tmp_path, cfg(spec, "lr_x=1"), mit)
    return pair(the(analyze(tmp_path), "toy"), "lr_x=1")


def test_stalled_mitigation_is_not_a_fix(tmp_path):
    p = _one(tmp_path, failing(3, 10, CAUSE), stalled(3), predicted="fixes")
    assert (p.measured, p.agreement) == ("stalls", "refutes")
    assert "not trained" in p.detail


def test_stalled_counts_as_no_effect_for_agreement(tmp_path):
    p = _one(tmp_path, failing(3, 10, CAUSE), ok(1) + stalled(2), predicted="no_effect")
    assert (p.measured, p.agreement) == ("stalls", "agrees")


@pytest.mark.parametrize(
    "step, effect",
    [(25, "delays"), (15, "delays"), (14, "no_effect"), (10, "no_effect"), (9, "worsens")],
)
def test_delays_needs_1_5x_and_gives_the_factor(tmp_path, step, effect):
    p = _one(tmp_path, failing(3, 10, CAUSE), failing(3, step, CAUSE), predicted="delays")
    assert p.measured == effect
    if effect == "delays":
        assert p.factor == pytest.approx(step / 10)
        assert f"{step / 10:.1f}x" in p.detail and p.agreement == "agrees"
    else:
        assert p.agreement == "disagrees"


def test_delays_uses_medians_of_failing_seeds(tmp_path):
    # baseline steps 8, 10, 30 -> median 10; mitigation 16, 20, 2 -> median 16 (1.6x)
    base = [("nonfinite", 8, CAUSE), ("nonfinite", 10, CAUSE), ("nonfinite", 30, CAUSE)]
    mit = [("nonfinite", 16, CAUSE), ("nonfinite", 20, CAUSE), ("nonfinite", 2, CAUSE)]
    p = _one(tmp_path, base, mit, predicted="delays")
    assert p.measured == "delays" and p.factor == pytest.approx(1.6)


@pytest.mark.parametrize(
    "base_frac, mit_frac, effect",
    [(0.05, 0.9, "worsens"), (0.05, 0.14, "no_effect"), (0.5, 0.2, "no_effect")],
)
def test_worsens_by_nonfinite_param_frac(tmp_path, base_frac, mit_frac, effect):
    p = _one(
        tmp_path,
        failing(3, 10, CAUSE, base_frac),
        failing(3, 10, CAUSE, mit_frac),
        predicted="worsens",
    )
    assert p.measured == effect
    if effect == "worsens":
        assert f"{base_frac:.2f} -> {mit_frac:.2f}" in p.detail
        assert p.agreement == "agrees"


def test_diverged_and_nonfinite_are_counted_apart_and_both_fail(tmp_path):
    base = failing(2, 10, CAUSE) + failing(1, 12, CAUSE, status="diverged")
    p = _one(tmp_path, base, failing(3, 10, CAUSE))
    m_base = p.cell  # the mitigation; check the baseline through the analysis
    assert m_base.n_nonfinite == 3
    a = analyze(tmp_path)
    b = the(a, "toy").base
    assert (b.n_nonfinite, b.n_diverged, b.n_failed) == (2, 1, 3)
    assert the(a, "toy").counts


# --------------------------------------------------------------------------- cells


def test_seeds_are_pooled_only_by_cell(tmp_path):
    """Two configs with identical axes columns (they differ in data.image_size) are two
    cells; the mitigation with the other image size is not the mitigation of this baseline."""
    spec = mech(
        "toy", CAUSE, BASELINE, [pred("max_subtracted_softmax", ["softmax=stable"], "fixes")]
    )
    seeds(tmp_path, cfg(spec), failing(3, 10, CAUSE))
    seeds(tmp_path, cfg(spec, "softmax=stable"), ok(3))
    seeds(tmp_path, cfg(spec, "softmax=stable", "data.image_size=112"), failing(3, 10, CAUSE))
    df = report.collect(tmp_path)
    axes = [
        "precision",
        "softmax",
        "lr",
        "lr_x",
        "warmup_steps",
        "clip",
        "normalize",
        "stress",
        "guard",
        "model",
        "data",
    ]
    stable = df[df["softmax"] == "stable"]
    assert len(stable.drop_duplicates(axes)) == 1  # the axes alone cannot tell ...
    assert stable["cell"].nunique() == 2  # ... the cell can
    cells = report.build_cells(df)
    assert sorted(c.n_seeds for c in cells if c.softmax == "stable") == [3, 3]
    m = the(report.analyze(df), "toy")
    p = pair(m, "softmax=stable")
    assert (p.measured, p.n_matches) == ("fixes", 1)
    assert len(m.others) == 1 and m.others[0].config["data"]["image_size"] == 112


def test_mitigation_must_differ_in_that_setting_only(tmp_path):
    spec = mech(
        "toy", CAUSE, BASELINE, [pred("max_subtracted_softmax", ["softmax=stable"], "fixes")]
    )
    seeds(tmp_path, cfg(spec), failing(3, 10, CAUSE))
    seeds(tmp_path, cfg(spec, "softmax=stable", "warmup_steps=5"), ok(3))
    m = the(analyze(tmp_path), "toy")
    assert pair(m, "softmax=stable").status == "not run"
    assert not m.control


def test_several_baselines_are_separate_contexts(tmp_path):
    spec = mech(
        "toy", CAUSE, BASELINE, [pred("max_subtracted_softmax", ["softmax=stable"], "fixes")]
    )
    for size, mit in ((56, ok(3)), (112, failing(3, 10, CAUSE))):
        seeds(tmp_path, cfg(spec, f"data.image_size={size}"), failing(3, 10, CAUSE))
        seeds(tmp_path, cfg(spec, f"data.image_size={size}", "softmax=stable"), mit)
    ms = [m for m in analyze(tmp_path).mechanisms if m.name == "toy"]
    assert len(ms) == 2
    by_size = {m.base.config["data"]["image_size"]: m for m in ms}
    assert pair(by_size[56], "softmax=stable").measured == "fixes"
    assert pair(by_size[112], "softmax=stable").measured == "no_effect"
    assert all("image_size" in m.label for m in ms)


def test_predictions_come_from_the_records(tmp_path):
    """A mechanism no conf/stress YAML defines: the report knows it from the records."""
    spec = mech(
        "made_up_here",
        "half_overflow",
        ["precision=fp16"],
        [pred("brand_new_advice", ["precision=fp32"], "fixes")],
    )
    seeds(tmp_path, cfg(spec), failing(3, 0, "half_overflow"))
    seeds(tmp_path, cfg(spec, "precision=fp32"), ok(3))
    a = analyze(tmp_path)
    m = the(a, "made_up_here")
    assert m.counts and pair(m, "precision=fp32").agreement == "agrees"
    [ln] = [x for x in a.advice if x.id == "brand_new_advice"]
    assert ln.text == "brand_new_advice" and ln.line.startswith("fixes made_up_here")


def test_bf16_range_pairs(tmp_path):
    """Core cells that differ only in fp32 vs bf16: same outcome counted."""
    from test_report_builders import config_for as core

    for x, (o32, o16) in {
        1: (ok(3), ok(3)),
        3: (ok(3), failing(3, 5, CAUSE)),
        10: (failing(3, 5, CAUSE), failing(3, 6, CAUSE)),
    }.items():
        seeds(tmp_path, core(None, ["precision=fp32", f"lr_x={x}"]), o32)
        seeds(tmp_path, core(None, ["precision=bf16", f"lr_x={x}"]), o16)
    seeds(tmp_path, core(None, ["precision=bf16", "lr_x=30"]), ok(3))  # no fp32 partner
    r = analyze(tmp_path).range_pairs
    assert (r.n, r.same, len(r.differ)) == (3, 2, 1)
    assert "lr_x=3" in r.differ[0]
    assert "88.72" in r.line and "11.09" in r.line and "3 pairs" in r.line


def test_monitor_evidence_counts_named_causes(tmp_path):
    from test_report_builders import config_for as core

    seeds(tmp_path, core(None, ["lr_x=1"]), failing(3, 5, CAUSE))
    seeds(tmp_path, core(None, ["lr_x=3"]), failing(1, 5, "unknown") + ok(2))
    a = analyze(tmp_path)
    assert "named a cause for 3 of 4 failing runs" in line(a, "monitor")


@pytest.mark.parametrize(
    "n_ok, n_bad, effect", [(3, 2, "mixed"), (4, 2, "fixes"), (2, 4, "no_effect"), (2, 3, "mixed")]
)
def test_two_thirds_is_two_thirds_not_a_majority(tmp_path, n_ok, n_bad, effect):
    p = _one(tmp_path, failing(5, 10, CAUSE), ok(n_ok) + failing(n_bad, 10, CAUSE))
    assert p.measured == effect, (n_ok, n_bad)


@pytest.mark.parametrize("k, n, counts", [(3, 5, False), (4, 6, True), (4, 5, True)])
def test_baseline_two_thirds_with_more_seeds(tmp_path, k, n, counts):
    spec = mech(
        "toy", CAUSE, BASELINE, [pred("max_subtracted_softmax", ["softmax=stable"], "fixes")]
    )
    seeds(tmp_path, cfg(spec), failing(k, 10, CAUSE) + ok(n - k))
    seeds(tmp_path, cfg(spec, "softmax=stable"), ok(3))
    assert the(analyze(tmp_path), "toy").counts is counts


def test_a_mechanism_may_declare_several_causes(tmp_path):
    """logit_growth fails at either end of exp()'s range: both causes count for it, no other."""
    spec = mech(
        "toy",
        ["exp_overflow", "exp_underflow"],
        BASELINE,
        [pred("max_subtracted_softmax", ["softmax=stable"], "fixes")],
    )
    seeds(
        tmp_path,
        cfg(spec),
        failing(1, 10, "exp_overflow")
        + failing(1, 10, "exp_underflow")
        + failing(1, 10, "masked_row"),
    )
    seeds(tmp_path, cfg(spec, "softmax=stable"), ok(3))
    assert the(analyze(tmp_path), "toy").counts is True  # 2 of 3 with a declared cause
    other = tmp_path / "other"
    seeds(other, cfg(spec), failing(1, 10, "exp_overflow") + failing(2, 10, "masked_row"))
    seeds(other, cfg(spec, "softmax=stable"), ok(3))
    m = the(analyze(other), "toy")
    assert m.status == "baseline did not fail with exp_overflow or exp_underflow (1/3 seeds)"


# --------------------------------------------------------------------------- the control


def _controlled(tmp_path, control_outcomes):
    """A mechanism whose baseline fails with CAUSE and whose fix works; its control (the
    baseline with stress=none) given `control_outcomes` (None: not run)."""
    spec = mech(
        "toy",
        CAUSE,
        BASELINE,
        [pred("max_subtracted_softmax", ["softmax=stable"], "fixes")],
        control=["stress=none"],
    )
    seeds(tmp_path, cfg(spec), failing(3, 10, CAUSE))
    seeds(tmp_path, cfg(spec, "softmax=stable"), ok(3))
    if control_outcomes is not None:
        from test_report_builders import config_for

        seeds(tmp_path, config_for(None, BASELINE), control_outcomes)
    return the(analyze(tmp_path), "toy")


def test_a_clean_control_lets_the_mechanism_count(tmp_path):
    m = _controlled(tmp_path, ok(3))
    assert m.control_cell is not None and m.control_cell.n_ok == 3
    assert m.counts and pair(m, "softmax=stable").measured == "fixes"


def test_a_control_that_fails_with_the_cause_means_the_mechanism_is_not_what_fails(tmp_path):
    m = _controlled(tmp_path, ok(2) + failing(1, 10, CAUSE))
    assert not m.counts
    assert m.base_status.startswith(f"control failed with {CAUSE} too (1/3 seeds")
    assert not pair(m, "softmax=stable").counts


def test_a_control_failing_otherwise_does_not_block(tmp_path):
    """Only the declared cause says the trigger was not needed."""
    m = _controlled(tmp_path, failing(3, 5, "masked_row"))
    assert m.counts


def test_a_declared_control_that_did_not_run_counts_nowhere(tmp_path):
    m = _controlled(tmp_path, None)
    assert not m.counts and m.base_status == "control not run (stress=none)"
