"""The LR sensitivity (Wortsman et al. 2023) per precision x mitigation: nanlab/report/sensitivity.py
on constructed records (tests/test_report_builders.py's way) with known losses, against
sensitivities computed by hand below."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pandas as pd
import pytest
from test_report_builders import BASE, apply, run

from nanlab import report
from nanlab.report.sensitivity import families

OPTIM = {"name": "adamw", "eps": 1e-8, "betas": [0.9, 0.999], "z_loss": 0.0}
LRS = (0.1, 1, 10, 100)
ARMS = {"none": [], "z": ["optim.z_loss=1.0e-4"], "qk": ["model.qk_norm=true"]}


def base(precision: str, lr_x: float, arm: list[str]) -> dict:
    cfg = copy.deepcopy(BASE)
    cfg["optim"] = copy.deepcopy(OPTIM)
    cfg["model"]["qk_norm"] = False
    return apply(cfg, [f"precision={precision}", f"lr_x={lr_x}", *arm])


def ok(final, init=3.0):
    return ("ok", init, final)


def bad(status="nonfinite", init=3.0, final=7.0):
    """A failed run; its last finite loss (`final`) must not count, its initial loss does."""
    return (status, init, final)


# (precision, arm) -> lr_x -> one tuple (status, initial_loss, final_loss) per seed
LOSSES = {
    ("bf16", "none"): {
        0.1: [ok(2.0), ok(2.2)],
        1: [ok(1.0), ok(1.2), ("error", None, None)],
        10: [ok(1.5), bad()],
        100: [bad("diverged", final=50.0), bad("diverged", final=60.0)],
    },
    ("bf16", "z"): {
        0.1: [ok(2.4), ok(2.4)],
        1: [ok(1.2), ok(1.2)],
        10: [ok(1.3), ok(1.5)],
        100: [("stalled", 3.0, 3.4), ("stalled", 3.0, 3.4)],
    },
    # its own base: initial loss 4.0; one failed run without an initial loss (family median)
    ("bf16", "qk"): {
        0.1: [ok(3.0, 4.0), ok(3.0, 4.0)],
        1: [ok(2.0, 4.0), ok(2.0, 4.0)],
        10: [ok(0.9, 4.0), ok(1.1, 4.0)],
        100: [bad(init=4.0), bad(init=None)],
    },
    ("fp16", "none"): {
        0.1: [ok(2.0), ok(2.0)],
        1: [bad(), bad()],
        10: [bad(), bad()],
        100: [bad(), bad()],
    },
    ("fp16", "z"): {
        0.1: [ok(1.8), ok(2.0)],
        1: [ok(1.6), ok(1.6)],
        10: [bad(), bad()],
        100: [bad(), bad()],
    },
    ("fp16", "qk"): {
        0.1: [ok(3.0, 4.0), ok(3.0, 4.0)],
        1: [ok(1.5, 4.0), ok(1.5, 4.0)],
        10: [ok(1.4, 4.0), ok(1.6, 4.0)],
        100: [bad("diverged", 4.0, 90.0), bad("diverged", 4.0, 80.0)],
    },
}

# By hand: per lr_x, min(mean over seeds with failures at l0, l0) - l*, then the mean.
# bf16: l* = 1.0 (qk at lr_x 10: (0.9 + 1.1) / 2)
#   none: 2.1, 1.1, (1.5 + 3.0) / 2 = 2.25, 3.0 -> 1.1 + 0.1 + 1.25 + 2.0 = 4.45 / 4
#   z:    2.4, 1.2, 1.4, min(3.4, 3.0) = 3.0   -> 1.4 + 0.2 + 0.4 + 2.0 = 4.0 / 4
#   qk:   3.0, 2.0, 1.0, 4.0 (both at l0 4.0) -> 2.0 + 1.0 + 0.0 + 3.0 = 6.0 / 4
# fp16: l* = 1.5 (qk at lr_x 1, and at 10)
#   none: 2.0, 3.0, 3.0, 3.0 -> 0.5 + 1.5 + 1.5 + 1.5 = 5.0 / 4
#   z:    1.9, 1.6, 3.0, 3.0 -> 0.4 + 0.1 + 1.5 + 1.5 = 3.5 / 4
#   qk:   3.0, 1.5, 1.5, 4.0 -> 1.5 + 0.0 + 0.0 + 2.5 = 4.0 / 4
EXPECTED = {
    ("bf16", "none"): 1.1125,
    ("bf16", "z"): 1.0,
    ("bf16", "qk"): 1.5,
    ("fp16", "none"): 1.25,
    ("fp16", "z"): 0.875,
    ("fp16", "qk"): 1.0,
}
STAR = {"bf16": 1.0, "fp16": 1.5}
RANKS = {"bf16": ["z", "none", "qk"], "fp16": ["z", "qk", "none"]}
LABEL = {"none": "none", "z": "optim.z_loss=0.0001", "qk": "model.qk_norm=true"}
ADVICE = {"none": "", "z": "z_loss", "qk": "qk_norm"}
MAX_ALL_OK = {
    ("bf16", "none"): 1,
    ("bf16", "z"): 10,
    ("bf16", "qk"): 10,
    ("fp16", "none"): 0.1,
    ("fp16", "z"): 1,
    ("fp16", "qk"): 10,
}


def sweep(root: Path) -> Path:
    for (precision, arm), by_lr in LOSSES.items():
        for lr_x, seeds in by_lr.items():
            for seed, (status, init, final) in enumerate(seeds):
                run(
                    root,
                    base(precision, lr_x, ARMS[arm]),
                    seed,
                    status,
                    initial_loss=init,
                    final_loss=final,
                )
    # a family with two lr_x values only: not counted, and its low loss is not l*
    for lr_x in (0.1, 1):
        for seed in (0, 1):
            run(root, base("bf16", lr_x, ["warmup_steps=5"]), seed, "ok", final_loss=0.5)
    # a mechanism's runs over three lr_x: not an LR family (stress is not none)
    spec = {"name": "lr_spike", "cause": "divergence", "baseline": [], "predictions": []}
    for lr_x in (0.1, 1, 10):
        cfg = base("bf16", lr_x, [])
        cfg["stress"] = copy.deepcopy(spec)
        run(root, cfg, 0, "ok", final_loss=0.1)
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return sweep(tmp_path_factory.mktemp("lr"))


@pytest.fixture(scope="module")
def fs(root):
    return families(report.collect(root))


def _find(fs, precision: str, arm: str):
    [f] = [f for f in fs if f.precision == precision and f.label == LABEL[arm]]
    return f


def test_sensitivity_equals_the_hand_computation(fs):
    for (precision, arm), want in EXPECTED.items():
        f = _find(fs, precision, arm)
        assert f.counts and f.axis == "lr_x" and f.xs == list(LRS)
        assert f.ell_star == pytest.approx(STAR[precision])
        assert f.sensitivity == pytest.approx(want), (precision, arm)
        # Wortsman's own-curve variant differs by (best - l*)
        assert f.sensitivity_own == pytest.approx(want - (f.best.loss - STAR[precision]))
        assert f.max_all_ok == MAX_ALL_OK[(precision, arm)]


def test_failures_count_at_the_initial_loss(fs):
    none = _find(fs, "bf16", "none")
    p10 = next(p for p in none.points if p.x == 10)
    assert p10.finals == [1.5] and p10.failed == [3.0]  # not its last finite loss 7.0
    p100 = next(p for p in none.points if p.x == 100)
    assert p100.loss == 3.0 and p100.raw == 3.0  # diverged: not 50 / 60
    # a run with no initial loss counts at its family's median initial loss (4.0, not 3.0)
    qk = _find(fs, "bf16", "qk")
    assert next(p for p in qk.points if p.x == 100).failed == [4.0, 4.0]
    # stalled runs are finite: their final loss counts, capped at l0
    z = _find(fs, "bf16", "z")
    p = next(p for p in z.points if p.x == 100)
    assert (p.raw, p.loss) == (pytest.approx(3.4), 3.0)
    # the error run is no evidence
    assert none.n_no_evidence == 1 and none.n_runs == 8 and none.n_failed == 3


def test_ranking_within_each_precision(fs):
    for precision, order in RANKS.items():
        ranked = sorted(
            (f for f in fs if f.precision == precision and f.counts), key=lambda f: f.rank
        )
        assert [f.label for f in ranked] == [LABEL[a] for a in order]
        assert [f.rank for f in ranked] == [1, 2, 3]
    lines = report.ranking_lines(fs)
    assert lines[0].startswith(
        "bf16 (ℓ* 1): 1. z_loss (optim.z_loss=0.0001) 1, 2. none 1.11,"
        " 3. qk_norm (model.qk_norm=true) 1.5"
    )
    assert lines[1].startswith("fp16")


def test_seeds_range_and_ties_by_hand(fs):
    """Each seed's sensitivity alone (l* of the precision), min-max; a family whose range
    overlaps rank 1's is not told apart from it.
    bf16 z:    seed 0: 1.4 + 0.2 + 0.3 + 2.0 = 3.9 / 4; seed 1: 1.4 + 0.2 + 0.5 + 2.0 = 4.1 / 4
    bf16 none: seed 0: 1.0 + 0.0 + 0.5 + 2.0 = 3.5 / 4; seed 1: 1.2 + 0.2 + 2.0 + 2.0 = 5.4 / 4
               (seed 2 ran at one lr_x only, as an error: no evidence)
    bf16 qk:   seed 0: 2.0 + 1.0 - 0.1 + 3.0 = 5.9 / 4; seed 1: 2.0 + 1.0 + 0.1 + 3.0 = 6.1 / 4
    fp16 z 0.85-0.9, qk 0.975-1.025, none 1.25: no overlap with rank 1."""
    from nanlab.report.sensitivity import by_group, tied_with_first

    assert _find(fs, "bf16", "z").seed_range == pytest.approx((0.975, 1.025))
    assert _find(fs, "bf16", "none").seed_range == pytest.approx((0.875, 1.35))
    assert _find(fs, "bf16", "qk").seed_range == pytest.approx((1.475, 1.525))
    assert _find(fs, "fp16", "z").seed_range == pytest.approx((0.85, 0.9))
    groups = by_group(fs)
    assert [f.label for f in tied_with_first(groups["bf16"])] == ["none"]
    assert tied_with_first(groups["fp16"]) == []


def test_few_lrs_and_mechanisms_are_not_families(fs):
    few = [f for f in fs if not f.counts]
    assert [(f.label, f.advice, f.xs, f.rank, f.sensitivity) for f in few] == [
        ("warmup_steps=5", "warmup", [0.1, 1], None, None)
    ]
    assert all(f.config["stress"]["name"] == "none" for f in fs)
    assert len(fs) == 7


def test_labels_and_advice_from_the_overrides(tmp_path):
    arms = {
        "none": [],
        "optim.name=stable_adamw": ["optim.name=stable_adamw"],
        "optim.betas=[0.9,0.95] optim.eps=1e-06": ["optim.eps=1.0e-6", "optim.betas=[0.9,0.95]"],
        "softmax=fp32_qk": ["softmax=fp32_qk"],
        "softmax=stable": ["softmax=stable"],
        "clip=0.1": ["clip=0.1"],
        "warmup_steps=5": ["warmup_steps=5"],
    }
    for arm in arms.values():
        for lr_x in (0.3, 3, 30):
            run(tmp_path, base("bf16", lr_x, arm), 0, "ok", final_loss=1.0 + lr_x / 100)
    fs = families(report.collect(tmp_path))
    got = {f.label: f.advice for f in fs}
    assert got == {
        "none": "",
        "optim.name=stable_adamw": "update_clipping",
        "optim.betas=[0.9,0.95] optim.eps=1e-06": "adam_eps_beta2",
        "softmax=fp32_qk": "fp32_qk",
        "softmax=stable": "max_subtracted_softmax",
        "clip=0.1": "clip",
        "warmup_steps=5": "warmup",
    }
    assert set(got) == set(arms)
    # all alike: every family ties at rank 1; (0 + 0.027 + 0.297) / 3
    assert {f.rank for f in fs} == {1}
    assert [f.sensitivity for f in fs] == [pytest.approx(0.108)] * len(fs)
    assert report.advice_for("clip", "0") is None and report.advice_for("clip", "0.1") == "clip"
    assert report.advice_for("model.qk_norm", "false") is None


def test_report_section_csv_console_and_figure(root, tmp_path):
    from rich.console import Console

    buf = io.StringIO()
    out = tmp_path / "out"
    md = report.write_report([root], out, console=Console(file=buf, width=200)).read_text()
    sec = md[md.index("## LR sensitivity") : md.index("## Appendix")]
    assert "![LR sensitivity](lr_sensitivity.png)" in sec and report.SENSITIVITY_RULE in sec
    assert (
        "| bf16 | 1 | `optim.z_loss=0.0001` | z_loss | 0.1–100 (4) | 1.000 | 0.975–1.02 "
        "| 1.2 @ 1 | 1 | 10 | 0/8 |"
    ) in sec
    assert (
        "| fp16 | 3 | `none` |  | 0.1–100 (4) | 1.250 | 1.25–1.25 | 2 @ 0.1 | 1.5 | 0.1 | 6/8 |"
    ) in sec
    assert "  - not told apart from rank 1 by these seeds (seeds' ranges overlap): `none`" in sec
    assert (
        "- **fp16**: 1. `z_loss` (add a z-loss; `optim.z_loss=0.0001`) 0.875; 2. `qk_norm`" in sec
    )
    assert "Not counted (fewer than 3 lr values): bf16 `warmup_steps=5` (0.1 1)." in sec
    assert "`update_clipping`" in sec.split("no family in this sweep:")[1]
    csv = pd.read_csv(out / "lr_sensitivity.csv")
    assert len(csv) == 7 and csv["counts"].sum() == 6
    row = csv[(csv["precision"] == "fp16") & (csv["mitigation"] == "model.qk_norm=true")].iloc[0]
    assert (row["sensitivity"], row["rank"], row["ell_star"], row["advice"]) == (
        pytest.approx(1.0),
        2,
        pytest.approx(1.5),
        "qk_norm",
    )
    text = buf.getvalue()
    assert "LR sensitivity" in text and "E_lr[min(l(lr), l0) - l*]" in text
    assert "bf16 (ℓ* 1): 1. z_loss (optim.z_loss=0.0001) 1, 2. none 1.11" in text
    import matplotlib.image as mpimg

    img = mpimg.imread(out / "lr_sensitivity.png")
    assert img.shape[1] > 1000 and img[..., :3].std() > 0.05
    # failed runs' markers in a family colour: tab10 blue (#1f77b4) and black lines are drawn
    blue = (
        (abs(img[..., 0] - 0.12) < 0.05)
        & (abs(img[..., 1] - 0.47) < 0.05)
        & (abs(img[..., 2] - 0.71) < 0.05)
    )
    assert blue.sum() > 50


def test_no_lr_sweep_says_so(tmp_path):
    for lr_x in (0.3, 3):
        run(tmp_path / "runs", base("bf16", lr_x, []), 0, "ok")
    out = tmp_path / "out"
    md = report.write_report([tmp_path / "runs"], out).read_text()
    sec = md[md.index("## LR sensitivity") : md.index("## Appendix")].strip().splitlines()
    assert (
        len(sec) == 3
        and sec[2].startswith("_No LR sweep in these records")
        and "(1 with fewer)" in sec[2]
    )
    assert (out / "lr_sensitivity.png").stat().st_size > 0
    csv = pd.read_csv(out / "lr_sensitivity.csv")
    assert len(csv) == 1 and not csv["counts"].any()
