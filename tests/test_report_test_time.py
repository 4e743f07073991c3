"""Issue 10 in the report: the test-time pass beside training, and mechanisms judged at test
time (`judged_on: test`), each pinned on constructed records (test_report_builders.py).

Expected values come from the construction (which seeds trained finite, which test samples
failed), not from the engine.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_report_builders import (
    TEST_IDS,
    TEST_SAMPLES,
    cfg,
    config_for,
    failing,
    mech,
    not_served,
    ok,
    pred,
    run,
    seeds,
    served_bad,
    stalled,
)

from nanlab import report
from nanlab.report.figures import TEST_FAILS_COLOR, TEST_FAILS_TEXT

CAUSE = "masked_row"
BASELINE = ["precision=bf16", "softmax=stable", "serve.precision=bf16_autocast"]
PADS = {1: 5, 4: 3}  # the left-padded test samples that fail: index -> pads
IDS = [TEST_IDS[i] for i in PADS]
CONTROL = pred("max_subtracted_softmax", ["softmax=eager"], "fixes")


def serving(*predictions: dict, name: str = "serving") -> dict:
    return mech(name, CAUSE, BASELINE, [CONTROL, *predictions], judged_on="test")


def analyze(root: Path) -> report.Analysis:
    return report.analyze(report.collect(root))


def the(a: report.Analysis, name: str = "serving") -> report.Mechanism:
    [m] = [m for m in a.mechanisms if m.name == name]
    return m


def pair(m: report.Mechanism, arm: str) -> report.Pair:
    [p] = [p for p in m.pairs if p.arm == arm]
    return p


def advice(a: report.Analysis, advice_id: str):
    [ln] = [x for x in a.advice if x.id == advice_id]
    return ln


def build(root: Path, spec: dict, base: list[tuple], arms: dict[str, list[tuple]]) -> None:
    """The baseline, the positive control (fixes: 3/3 ok) and `arms` (override -> seeds)."""
    seeds(root, cfg(spec), base)
    seeds(root, cfg(spec, "softmax=eager"), ok(3))
    for arm, outcomes in arms.items():
        seeds(root, cfg(spec, *arm.split()), outcomes)


# --------------------------------------------------------------------------- baseline


def test_baseline_trains_finite_and_fails_at_test_on_exactly_its_padded_samples(tmp_path):
    spec = serving(pred("use_fp32", ["precision=fp32"], "no_effect"))
    build(
        tmp_path,
        spec,
        served_bad(2, PADS) + served_bad(1, PADS, status="stalled"),
        {"precision=fp32": served_bad(3, PADS)},
    )
    m = the(analyze(tmp_path))
    b = m.base
    assert m.at_test and m.counts and m.status == "counts"
    assert (b.n_ok, b.n_stalled, b.n_failed, b.state) == (2, 1, 0, "ok")  # training: fine
    assert (b.n_test_finite, b.n_test_nonfinite, b.n_test_not_run) == (0, 3, 0)
    assert b.outcome == report.TEST_FAILS
    assert b.test_failing == dict.fromkeys(IDS, 3)  # the union, with seed counts
    assert b.test_pads == {TEST_IDS[1]: 5, TEST_IDS[4]: 3}
    assert b.test_causes == {CAUSE: 3} and b.test_samples == TEST_SAMPLES
    assert b.median_test_nonfinite == len(PADS)
    assert b.test_ids_text() == "shapes/test/1 (pad 5) ×3, shapes/test/4 (pad 3) ×3"
    assert b.test_counts() == "3/3 non-finite at test time"
    head, note = report.figures._row_label(m)
    assert "(judged at test time)" in head and "masked_row at test · 3/3 failed" in head
    assert note == ""


@pytest.mark.parametrize(
    "base, k",
    [
        (ok(3), 0),  # the test pass stayed finite
        (served_bad(1, PADS) + ok(2), 1),  # 1 of 3 is not 2/3
        (failing(3, 0, CAUSE), 0),  # failing in training is not it
        (served_bad(3, PADS, cause="half_overflow"), 0),  # another cause
        (not_served(3), 0),  # no test pass at all
    ],
)
def test_baseline_whose_test_pass_did_not_fail_is_not_counted(tmp_path, base, k):
    spec = serving(pred("use_fp32", ["precision=fp32"], "no_effect"))
    build(tmp_path, spec, base, {"precision=fp32": served_bad(3, PADS)})
    a = analyze(tmp_path)
    m = the(a)
    reason = (
        f"baseline did not fail at test time with {CAUSE} ({k}/3 seeds trained finite "
        "and failed the test pass)"
    )
    assert not m.counts and m.status == reason
    assert all(not p.counts and p.status == reason and p.measured is None for p in m.pairs)
    assert advice(a, "use_fp32").line == (
        "not tested in training. Test time: not counted: "
        "serving (baseline did not fail at test time with "
        "its cause)"
    )


def test_two_of_three_seeds_failing_at_test_count(tmp_path):
    spec = serving()
    build(tmp_path, spec, served_bad(2, PADS) + ok(1), {})
    assert the(analyze(tmp_path)).counts


# --------------------------------------------------------------------------- effects


def test_fixes_at_test_time_whatever_the_training_outcome(tmp_path):
    spec = serving(
        pred("right_padding", ["serve.padding_side=right"], "fixes"),
        pred("serve_precision", ["serve.precision=fp32"], "fixes"),
        pred("serve_precision", ["serve.precision=bf16"], "fixes"),
    )
    build(
        tmp_path,
        spec,
        served_bad(3, PADS),
        {
            "serve.padding_side=right": stalled(3),  # stalled, served finite: a fix
            "serve.precision=fp32": ok(2) + served_bad(1, PADS),
            "serve.precision=bf16": ok(1) + served_bad(2, PADS),  # still non-finite: refutes
        },
    )
    a = analyze(tmp_path)
    m = the(a)
    got = {p.arm: (p.measured, p.agreement) for p in m.pairs}
    assert got == {
        "softmax=eager": ("fixes", "agrees"),
        "serve.padding_side=right": ("fixes", "agrees"),
        "serve.precision=fp32": ("fixes", "agrees"),
        "serve.precision=bf16": ("no_effect", "refutes"),
    }
    right = pair(m, "serve.padding_side=right")
    assert right.detail == "3/3 seeds trained finite and served finite; training 3/3 stalled"
    assert right.cell.outcome == "stalls" and m.control
    # the same stalled seeds judged on training would be "stalls", not a fix
    assert report.measure(m.base, right.cell).effect == "stalls"
    line = advice(a, "serve_precision")
    assert line.train_line == ""
    assert line.line.startswith(
        "not tested in training. Test time: fixes serving "
        "(serve.precision=fp32: 2/3 seeds served finite, non-finite "
        "test samples 2/8 -> 0/8)"
    )
    assert (
        "no effect on serving (serve.precision=bf16: 1/3 seeds served finite, non-finite "
        "test samples 2/8 -> 2/8; predicted fixes: refutes)"
    ) in line.line
    assert "fixes serving (serve.padding_side=right" in advice(a, "right_padding").line


def test_training_advice_without_test_time_effect(tmp_path):
    """use_fp32 fixes a training mechanism and does nothing for the served test split: the
    line says both, the training part first."""
    spec = serving(
        pred("use_fp32", ["precision=fp32"], "no_effect"), pred("lower_lr", ["lr_x=0.1"], "fixes")
    )
    build(
        tmp_path,
        spec,
        served_bad(3, PADS),
        {"precision=fp32": served_bad(3, PADS), "lr_x=0.1": served_bad(3, PADS, "stalled")},
    )
    train = mech(
        "toy", "half_overflow", ["precision=fp16"], [pred("use_fp32", ["precision=fp32"], "fixes")]
    )
    seeds(tmp_path, config_for(train, ["precision=fp16"]), failing(3, 0, "half_overflow"))
    seeds(tmp_path, config_for(train, ["precision=fp32"]), ok(3))
    a = analyze(tmp_path)
    fp32 = pair(the(a), "precision=fp32")
    assert (fp32.measured, fp32.agreement) == ("no_effect", "agrees")
    assert fp32.detail == (
        "non-finite at test time like the baseline: 3/3 non-finite at test "
        "time, non-finite test samples 2/8 -> 2/8"
    )
    lr = pair(the(a), "lr_x=0.1")
    assert (lr.measured, lr.agreement) == ("no_effect", "refutes")
    line = advice(a, "use_fp32")
    assert line.line == (
        "fixes toy (precision=fp32: 3/3 seeds ok, first bad step 0 -> none). "
        "Test time: no effect on serving (precision=fp32: 0/3 seeds served "
        "finite, non-finite test samples 2/8 -> 2/8)"
    )
    assert "serving" not in line.train_line
    assert advice(a, "lower_lr").test_line.startswith("test time: no effect on serving")


def test_worsens_and_mixed_at_test_time(tmp_path):
    more = {**PADS, 6: 7}
    spec = serving(
        pred("warmup", ["warmup_steps=10"], "no_effect"),
        pred("clip", ["clip=0.1"], "no_effect"),
        pred("lower_lr", ["lr_x=10"], "no_effect"),
        pred("guard_key_nodes", ["guard=skip_step"], "no_effect"),
    )
    build(
        tmp_path,
        spec,
        served_bad(3, PADS),
        {
            "warmup_steps=10": served_bad(3, more),  # 3 samples fail instead of 2
            "clip=0.1": served_bad(3, {1: 5}),  # fewer: still no effect
            "lr_x=10": failing(3, 4, "exp_overflow"),  # training itself fails now
            "guard=skip_step": ok(1) + served_bad(1, PADS) + failing(1, 4, "exp_overflow"),
        },
    )
    m = the(analyze(tmp_path))
    got = {p.arm: (p.measured, p.agreement) for p in m.pairs}
    assert got["warmup_steps=10"] == ("worsens", "disagrees")
    assert pair(m, "warmup_steps=10").detail == (
        "more test samples fail: non-finite test samples 2/8 -> 3/8"
    )
    assert got["clip=0.1"] == ("no_effect", "agrees")
    assert got["lr_x=10"] == ("worsens", "disagrees")
    assert pair(m, "lr_x=10").detail == "training itself fails: 3/3 non-finite"
    assert got["guard=skip_step"] == ("mixed", "disagrees")
    assert all(p.measured not in ("delays", "stalls") for p in m.pairs)


def test_acts_at_compares_with_the_end_of_training(tmp_path):
    spec = serving(
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
    )
    build(
        tmp_path,
        spec,
        served_bad(3, PADS),
        {
            "precision=progressive precision.switch_step=2": served_bad(3, PADS),
            "precision=progressive precision.switch_step=20": served_bad(3, PADS),
        },
    )
    m = the(analyze(tmp_path))
    early = pair(m, "precision=progressive precision.switch_step=2")
    late = pair(m, "precision=progressive precision.switch_step=20")
    assert early.counts and early.measured == "no_effect"
    assert late.status == (
        "excluded: acted at step 20, after the baseline failed at test time, after step 20"
    )


# --------------------------------------------------------------------------- cells


@pytest.mark.parametrize(
    "outcomes, outcome, counts",
    [
        (served_bad(3, PADS), report.TEST_FAILS, "3/3 non-finite at test time"),
        (
            served_bad(2, PADS) + ok(1),
            report.TEST_FAILS,
            "1 finite, 2 non-finite at test time of 3 served",
        ),
        (
            served_bad(1, PADS) + ok(2),
            "ok",
            "1 finite, 2 non-finite at test time of 3 served".replace("1 finite, 2", "2 finite, 1"),
        ),
        (
            served_bad(2, PADS) + not_served(1),
            report.TEST_FAILS,
            "2 non-finite at test time of 2 served (1 not run)",
        ),
        (
            served_bad(2, PADS, status="stalled") + ok(1),
            report.TEST_FAILS,
            "1 finite, 2 non-finite at test time of 3 served",
        ),
        (
            served_bad(2, PADS) + failing(1, 3, CAUSE),
            report.TEST_FAILS,
            "2 non-finite at test time of 2 served (1 not run)",
        ),
        (
            served_bad(1, PADS) + failing(2, 3, CAUSE),
            "fails",
            "1 non-finite at test time of 1 served (2 not run)",
        ),
        (not_served(3), "ok", "test not run"),
        (ok(3), "ok", "3/3 finite at test time"),
    ],
)
def test_cell_outcome_finite_in_training_non_finite_at_test(tmp_path, outcomes, outcome, counts):
    seeds(tmp_path, config_for(None, ["precision=bf16"]), outcomes)
    [c] = report.build_cells(report.collect(tmp_path))
    assert (c.outcome, c.test_counts()) == (outcome, counts)
    row = report.cells_frame([c]).iloc[0]
    assert row["outcome"] == outcome and row["test_counts"] == counts
    assert row["state"] == c.state  # the training outcome stays
    assert report.OUTCOME_TEXT[report.TEST_FAILS] == ("finite in training, non-finite at test time")


def test_results_keep_the_test_columns(tmp_path):
    seeds(tmp_path / "runs", config_for(None, ["lr_x=3"]), served_bad(2, PADS) + not_served(1))
    df = report.collect(tmp_path / "runs")
    report.write_results(df, tmp_path / "out")
    for name in ("results.parquet", "results.csv"):
        back = report.load_results(tmp_path / "out" / name)
        assert sorted(back["test_status"].astype(str)) == ["None", "nonfinite", "nonfinite"]
        row = back[back["test_status"] == "nonfinite"].iloc[0]
        assert json.loads(row["test_failing_ids"]) == IDS  # lists as JSON strings
        assert json.loads(row["test_failing_pads"]) == [5, 3]
        assert (
            row["test_nonfinite"],
            row["test_samples"],
            row["test_cause"],
            row["test_precision"],
        ) == (2, TEST_SAMPLES, CAUSE, "bf16")
        [c] = report.build_cells(back)
        assert c.test_failing == dict.fromkeys(IDS, 2) and c.n_test_not_run == 1


def test_records_without_a_test_pass_still_render(tmp_path):
    """Results written before issue 10: no test_* column at all."""
    seeds(tmp_path / "runs", config_for(None, ["lr_x=3"]), ok(3))
    df = report.collect(tmp_path / "runs")
    old = df.drop(columns=[c for c in df.columns if c.startswith("test_")])
    df2 = report.normalize_results(old)
    assert list(df2["test_failing_ids"]) == ["[]"] * 3
    a = report.analyze(df2)
    [c] = a.cells
    assert (c.outcome, c.test_counts()) == ("ok", "test not run")
    md = report.markdown.render(
        df2, a.cells, a.mechanisms, a.advice, a.range_pairs, a.frontier, report.write.NAMES
    )
    assert "_No run in these records served its test split" in md


# --------------------------------------------------------------------------- report


@pytest.fixture(scope="module")
def test_map(tmp_path_factory) -> Path:
    """The serving mechanism, a training mechanism whose fix fails at test time, and a core
    line with one cell finite in training but non-finite at test time."""
    root = tmp_path_factory.mktemp("tmap")
    spec = serving(
        pred("use_fp32", ["precision=fp32"], "no_effect"),
        pred("right_padding", ["serve.padding_side=right"], "fixes"),
    )
    build(
        root,
        spec,
        served_bad(3, PADS),
        {"precision=fp32": served_bad(3, PADS), "serve.padding_side=right": ok(3)},
    )
    train = mech(
        "rows",
        CAUSE,
        ["softmax=eager", "data.padding_side=left"],
        [pred("right_padding", ["data.padding_side=right"], "fixes")],
    )
    seeds(
        root, config_for(train, ["softmax=eager", "data.padding_side=left"]), failing(3, 0, CAUSE)
    )
    seeds(
        root, config_for(train, ["softmax=eager", "data.padding_side=right"]), served_bad(3, PADS)
    )
    for x, outcomes in ((0.3, ok(3)), (1, served_bad(3, PADS)), (3, failing(3, 5, "x"))):
        seeds(root, config_for(None, ["softmax=naive", f"lr_x={x}"]), outcomes)
    return root


@pytest.fixture(scope="module")
def built(test_map, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tout")
    report.write_report([test_map], out)
    return out


def test_report_md_training_vs_test_time(built):
    md = (built / "report.md").read_text()
    head = md.index("## Training vs test time")
    assert md.index("![mechanism x mitigation]") < head < md.index("## Verdict rules")
    section = md[head : md.index("## Verdict rules")]
    assert (
        "**4 of the 7 cells that stayed finite in training were non-finite at test time**"
    ) in section
    rows = [x for x in section.splitlines() if x.startswith("| ") and "shapes/test" in x]
    assert len(rows) == 4
    assert any(
        x.startswith(
            "| serving | baseline | bf16 | stable | lr_x=1 | bf16_autocast, "
            "left padding | 3/3 ok | 3/3 non-finite at test time | 2/8 | "
            "shapes/test/1 (pad 5) ×3, shapes/test/4 (pad 3) ×3 | masked_row 3"
        )
        for x in rows
    )
    assert any(x.startswith("| rows | `data.padding_side=right` |") for x in rows)
    assert any(x.startswith("| none |  | bf16 | naive | lr_x=1 |") for x in rows)
    assert (
        "- **serving** (cause `masked_row`): fixes: `softmax=eager`, "
        "`serve.padding_side=right`; no effect: `precision=fp32`"
    ) in section
    assert "finite in training, non-finite at test time 4" in md  # the summary line
    # the mechanism's table shows the test-time numbers
    assert "### serving (judged at test time)" in md
    [row] = [x for x in md.splitlines() if x.startswith("| use_fp32 | `precision=fp32`")]
    assert "| 3/3 ok | 3/3 non-finite at test time | 2/8 | shapes/test/1 (pad 5) ×3" in row
    # per advice: the training part, then the test-time part
    [item] = [x for x in md.splitlines() if x.startswith("- **pad on the right**")]
    assert (
        "fixes rows (data.padding_side=right: 3/3 seeds ok, first bad step 0 -> none; but "
        "non-finite at test time: 3/3 non-finite). Test time: fixes serving "
        "(serve.padding_side=right: 3/3 seeds served finite"
    ) in item
    # the frontier table names the lr_x that failed at test time
    assert "| bf16 | naive |  | 0.3 1 3 | 1 | 3 | yes | 3/3 3/3 0/3 | 1 |" in md
    v = report.load_results(built)
    assert {"test_status", "test_failing_ids", "test_cause"} <= set(v.columns)


def _pink(path: Path) -> int:
    import matplotlib.image as mpimg
    from matplotlib.colors import to_rgb

    img = mpimg.imread(path)[..., :3]
    return int((abs(img - to_rgb(TEST_FAILS_COLOR)).max(axis=-1) < 0.03).sum())


def _legend_texts(fig) -> list[str]:
    return [t.get_text() for leg in fig.legends for t in leg.get_texts()]


def test_the_outcome_has_its_own_colour_and_legend_entry_in_every_figure(test_map, tmp_path):
    a = analyze(test_map)
    figs = {
        "matrix": report.draw_matrix(a.mechanisms, tmp_path / "matrix.png"),
        "map": report.draw_map(a.cells, tmp_path / "map.png"),
        "frontier": report.draw_frontier(a.frontier, tmp_path / "frontier.png"),
    }
    for name, fig in figs.items():
        assert any(TEST_FAILS_TEXT in t.replace("\n", " ") for t in _legend_texts(fig)), name
    got = {name: _pink(tmp_path / f"{name}.png") for name in figs}
    # the same map where every test pass stayed finite: only the legend's patch is pink
    clean = tmp_path / "clean"
    for c in a.cells:
        for seed in range(c.n_seeds):
            status = "ok" if c.n_finite else "nonfinite"
            run(clean, {**c.config, "seed": seed}, seed, status, 5, CAUSE)
    b = analyze(clean)
    assert not any(c.outcome == report.TEST_FAILS for c in b.cells)
    report.draw_matrix(b.mechanisms, tmp_path / "matrix0.png")
    report.draw_map(b.cells, tmp_path / "map0.png")
    f0 = report.draw_frontier(b.frontier, tmp_path / "frontier0.png")
    assert not any(TEST_FAILS_TEXT in t.replace("\n", " ") for t in _legend_texts(f0))
    base = {name: _pink(tmp_path / f"{name}0.png") for name in figs}
    assert base["frontier"] == 0
    # matrix: two bands (its pink row text alone is ~300 px); map: four cells; frontier: a ring
    for name, more in (("matrix", 1000), ("map", 1000), ("frontier", 150)):
        assert got[name] > base[name] + more, (name, got[name], base[name])
