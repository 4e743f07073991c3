"""src/report.py on synthetic records: collect, cells, map, verdicts, frontier, CLI.

The synthetic grid (`make_records`) is built so that the expected answers are known:
precision {bf16, fp32} x softmax {naive, stable} x lr {1e-4, 1e-3, 1e-2} x warmup {0, 10}
x clip {0, 1} x seed {0, 1}.

* lr 1e-2: every run non-finite.
* lr 1e-3: naive non-finite (bf16: both seeds; fp32: seed 0 only, and fp32+clip=1 is ok);
  stable ok, except bf16+stable+clip=1 where seed 1 diverges.
* lr 1e-4: ok, except warmup=10 where seed 1 diverges; fp32 naive warmup=0 clip=0 seed 0
  errors.

So "use a max-subtracted softmax" (naive -> stable) supports, "add warmup" refutes (it only
hurts, at lr 1e-4), "clip gradients" cannot decide (helps twice, hurts twice), "normalize
inputs" cannot decide (no pairs).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from src import report
from src.record import Record, write_record

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

PRECISIONS = ("bf16", "fp32")
SOFTMAXES = ("naive", "stable")
LRS = (1e-4, 1e-3, 1e-2)
WARMUPS = (0, 10)
CLIPS = (0.0, 1.0)
SEEDS = (0, 1)


def synthetic_status(p: str, sm: str, lr: float, w: int, clip: float, seed: int) -> str:
    if p == "fp32" and sm == "naive" and lr == 1e-4 and w == 0 and clip == 0 and seed == 0:
        return "error"
    if lr == 1e-2:
        return "nonfinite"
    if lr == 1e-3:
        if sm == "naive":
            if p == "fp32" and clip == 1:
                return "ok"
            return "nonfinite" if (p == "bf16" or seed == 0) else "ok"
        if p == "bf16" and clip == 1 and seed == 1:
            return "diverged"
        return "ok"
    return "diverged" if (w == 10 and seed == 1) else "ok"


def make_records(root: Path, history: bool = True) -> list[Path]:
    """Write the synthetic grid under root (one run dir per run); returns the run dirs."""
    dirs = []
    i = 0
    for p in PRECISIONS:
        for sm in SOFTMAXES:
            for lr in LRS:
                for w in WARMUPS:
                    for clip in CLIPS:
                        for seed in SEEDS:
                            i += 1
                            st = synthetic_status(p, sm, lr, w, clip, seed)
                            step = None
                            if st == "nonfinite":
                                step = (5 if lr == 1e-2 else 40) + 10 * seed
                            elif st == "diverged":
                                step = 100 + seed
                            rec = Record(
                                precision=p, softmax=sm, lr=lr, warmup_steps=w, clip=clip,
                                seed=seed, model="tiny", data="shapes", status=st,
                                first_bad_step=step,
                                phase="forward" if st == "nonfinite" else None,
                                module=(("model.layers.0.self_attn" if sm == "naive"
                                         else "model.layers.1.mlp") if st == "nonfinite"
                                        else None),
                                error="RuntimeError: synthetic" if st == "error" else None,
                                final_loss=1.0, best_loss=0.9, max_grad_norm=2.0,
                                steps_done=step or 200, max_steps=200, wall_time_s=1.5,
                                config_hash=f"cfg{i:04d}", run_dir=f"run{i:04d}")
                            d = root / f"{p}-{sm}" / f"run{i:04d}"
                            write_record(rec, d)
                            if history and i % 7 == 0 and st != "error":
                                n = step or 20
                                rows = ["step,loss,grad_norm,lr"]
                                rows += [f"{k},{2.0 - k / (n + 1):.4f},{1 + k % 3},{lr}"
                                         for k in range(n)]
                                (d / "history.csv").write_text("\n".join(rows) + "\n")
                            dirs.append(d)
    return dirs


N_RUNS = len(PRECISIONS) * len(SOFTMAXES) * len(LRS) * len(WARMUPS) * len(CLIPS) * len(SEEDS)


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    make_records(root)
    return root


@pytest.fixture(scope="module")
def built(grid, tmp_path_factory) -> Path:
    """The full report written once for the module (the slow part: drawing the map)."""
    out = tmp_path_factory.mktemp("out")
    report.write_report([grid], out)
    return out


def _cell(c: pd.DataFrame, **kv) -> pd.Series:
    m = pd.Series(True, index=c.index)
    for k, v in kv.items():
        m &= c[k] == v
    sub = c[m]
    assert len(sub) == 1, (kv, len(sub))
    return sub.iloc[0]


# ----------------------------------------------------------------------------- collect

def test_collect_reads_all_and_writes_tables(grid, built):
    df = report.collect(grid)
    assert len(df) == N_RUNS
    assert df.attrs["duplicates_dropped"] == 0
    assert set(df["status"]) == {"ok", "nonfinite", "diverged", "error"}
    for name in ("results.parquet", "results.csv", "cells.csv", "nan_map.png", "report.md",
                 "verdicts.csv", "frontier.csv"):
        assert (built / name).stat().st_size > 0, name
    pq = pd.read_parquet(built / "results.parquet")
    csv = pd.read_csv(built / "results.csv")
    assert len(pq) == len(csv) == N_RUNS
    assert {"precision", "softmax", "lr", "seed", "status", "first_bad_step",
            "config_hash"} <= set(csv.columns)
    # the CSV round trip keeps what the analyses need
    back = report.load_results(built / "results.csv")
    pd.testing.assert_frame_equal(report.cells(back), report.cells(df), check_dtype=False)


def test_collect_drops_duplicates_keeping_newest(tmp_path):
    a = Record(precision="bf16", softmax="naive", lr=1e-3, seed=0, status="nonfinite",
               first_bad_step=3, config_hash="same")
    b = Record(precision="bf16", softmax="naive", lr=1e-3, seed=0, status="ok",
               config_hash="same")
    other = Record(precision="bf16", softmax="naive", lr=1e-3, seed=1, status="ok",
                   config_hash="other")
    old = write_record(a, tmp_path / "first" / "r")
    new = write_record(b, tmp_path / "second" / "r")
    write_record(other, tmp_path / "first" / "s")
    os.utime(old, (1_000_000, 1_000_000))
    os.utime(new, (2_000_000, 2_000_000))
    df = report.collect(tmp_path / "first", tmp_path / "second")
    assert len(df) == 2
    assert df.attrs["duplicates_dropped"] == 1
    kept = df[df["config_hash"] == "same"].iloc[0]
    assert kept["status"] == "ok" and kept["record_path"] == str(new)
    # newer on the other side: the non-finite one wins
    os.utime(old, (3_000_000, 3_000_000))
    df = report.collect(tmp_path)
    assert df[df["config_hash"] == "same"].iloc[0]["status"] == "nonfinite"


# ----------------------------------------------------------------------------- cells

def test_cells_aggregate_seeds(grid):
    c = report.cells(report.collect(grid))
    assert len(c) == N_RUNS // len(SEEDS)
    assert (c["n_seeds"] == 2).all()
    base = {"warmup_steps": 0, "clip": 0.0}
    x = _cell(c, precision="bf16", softmax="naive", lr=1e-3, **base)
    assert (x["outcome"], x["n_nonfinite"], x["frac_nonfinite"]) == ("nonfinite", 2, 1.0)
    assert x["median_bad_step"] == 45 and x["label"] == "2/2 @45"
    assert x["module"] == "model.layers.0.self_attn" and x["phase"] == "forward"
    x = _cell(c, precision="fp32", softmax="naive", lr=1e-3, **base)
    assert (x["outcome"], x["frac_nonfinite"], x["median_bad_step"]) == ("nonfinite", 0.5, 40)
    assert x["label"] == "1/2 @40"
    x = _cell(c, precision="fp32", softmax="naive", lr=1e-4, **base)   # one seed errored
    assert (x["outcome"], x["n_ok"], x["n_error"], x["frac_error"]) == ("ok", 1, 1, 0.5)
    assert x["frac_failed"] == 0 and math.isnan(x["median_bad_step"])
    x = _cell(c, precision="bf16", softmax="stable", lr=1e-3, warmup_steps=0, clip=1.0)
    assert (x["outcome"], x["frac_diverged"], x["label"]) == ("diverged", 0.5, "1/2 @101")
    x = _cell(c, precision="bf16", softmax="stable", lr=1e-2, **base)
    assert x["median_bad_step"] == 10 and x["module"] == "model.layers.1.mlp"
    x = _cell(c, precision="bf16", softmax="stable", lr=1e-4, **base)
    assert (x["outcome"], x["label"], x["frac_failed"]) == ("ok", "", 0.0)


def test_cell_outcome_is_worst_status():
    rows = [Record(precision="fp16", softmax="naive", lr=1e-3, seed=s, status=st,
                   first_bad_step=fb)
            for s, (st, fb) in enumerate([("error", None), ("ok", None), ("diverged", 9),
                                          ("nonfinite", 3), ("nonfinite", 7)])]
    df = pd.DataFrame([vars(r) for r in rows])
    x = report.cells(df).iloc[0]
    assert (x["outcome"], x["n_outcome"], x["median_bad_step"]) == ("nonfinite", 2, 5)
    assert x["frac_failed"] == pytest.approx(3 / 4)
    only_err = report.cells(df.iloc[:1]).iloc[0]
    assert only_err["outcome"] == "error" and math.isnan(only_err["frac_failed"])


# ----------------------------------------------------------------------------- the map

def test_map_png_is_valid(built, tmp_path):
    import matplotlib.image as mpimg
    img = mpimg.imread(built / "nan_map.png")
    h, w = img.shape[:2]
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    assert w >= 800 and h >= 300        # 4 facets side by side
    assert img[..., :3].std() > 0.05    # not blank
    # a single run: one value per axis, a single facet
    one = report.cells(pd.DataFrame([vars(Record(precision="bf16", softmax="naive", lr=1e-3,
                                                 status="nonfinite", first_bad_step=4))]))
    report.draw_map(one, tmp_path / "one.png")
    img = mpimg.imread(tmp_path / "one.png")
    assert img.shape[0] > 100 and img.shape[1] > 300


# ----------------------------------------------------------------------------- verdicts

def _by_hand(results_csv: Path, axis: str, base_to_advice) -> tuple[int, int, int, int]:
    """Independent recomputation: (helped, hurt, equally bad, both ok) from results.csv.

    base_to_advice: list of (baseline value, advice value) pairs of `axis`.
    """
    r = pd.read_csv(results_csv)
    r["model"] = r["model"].fillna("")
    r["data"] = r["data"].fillna("")
    axes = ["precision", "softmax", "lr", "warmup_steps", "clip", "normalize", "stress",
            "guard", "model", "data"]
    ran = r[r["status"] != "error"]
    frac = (ran.assign(bad=ran["status"].isin(["nonfinite", "diverged"]))
               .groupby(axes)["bad"].mean().rename("f").reset_index())
    others = [a for a in axes if a != axis]
    helped = hurt = same_bad = both_ok = 0
    for b, a in base_to_advice:
        m = frac[frac[axis] == b].merge(frac[frac[axis] == a], on=others,
                                        suffixes=("_b", "_a"))
        helped += int((m["f_a"] < m["f_b"]).sum())
        hurt += int((m["f_a"] > m["f_b"]).sum())
        same_bad += int(((m["f_a"] == m["f_b"]) & (m["f_b"] > 0)).sum())
        both_ok += int(((m["f_a"] == 0) & (m["f_b"] == 0)).sum())
    return helped, hurt, same_bad, both_ok


def _rule(helped: int, hurt: int, same_bad: int) -> str:
    if helped + hurt + same_bad == 0:
        return "cannot decide"
    if helped >= 1 and helped >= 2 * hurt:
        return "supports"
    if (hurt >= 1 and hurt >= 2 * helped) or helped == 0:
        return "refutes"
    return "cannot decide"


def _get(vs, advice: str, contrast: str):
    [v] = [v for v in vs if v.advice == advice and v.contrast == contrast]
    return v


def test_verdicts_match_independent_recomputation(built):
    vs = report.verdicts(report.load_results(built / "results.csv"))
    csv = built / "results.csv"

    v = _get(vs, "use a max-subtracted softmax", "naive -> stable")
    h = _by_hand(csv, "softmax", [("naive", "stable")])
    assert (v.helped, v.hurt, v.unchanged_bad, v.both_ok) == h
    assert v.verdict == _rule(*h[:3]) == "supports"

    v = _get(vs, "lower the lr", "lr -> next lower lr")
    h = _by_hand(csv, "lr", [(1e-3, 1e-4), (1e-2, 1e-3)])
    assert (v.helped, v.hurt, v.unchanged_bad, v.both_ok) == h
    assert v.verdict == _rule(*h[:3])
    assert v.n_pairs == 2 * 2 * 2 * 2 * 2     # 16 contexts x 2 steps down
    assert v.verdict == "supports"

    # the rest are known from the construction
    v = _get(vs, "add warmup", "0 -> >0")
    assert v.verdict == "refutes" and v.helped == 0 and v.hurt > 0
    v = _get(vs, "clip gradients", "0 -> >0")
    assert (v.helped, v.hurt, v.verdict) == (2, 2, "cannot decide")
    v = _get(vs, "normalize inputs", "False -> True")
    assert (v.n_pairs, v.verdict) == (0, "cannot decide")
    v = _get(vs, "use fp32", "bf16 -> fp32")
    assert v.verdict == "supports" and v.hurt == 0
    assert _get(vs, "use fp32", "fp16 -> fp32").n_pairs == 0

    # the report carries the rule and the verdicts
    md = (built / "report.md").read_text()
    assert report.VERDICT_RULE in md
    assert "| use a max-subtracted softmax | naive -> stable | supports |" in md


def test_decide_rule():
    assert report.decide(0, 0, 0) == "cannot decide"
    assert report.decide(1, 0, 5) == "supports"
    assert report.decide(2, 1, 0) == "supports"
    assert report.decide(0, 0, 3) == "refutes"
    assert report.decide(1, 2, 0) == "refutes"
    assert report.decide(2, 2, 0) == "cannot decide"
    assert report.decide(3, 2, 0) == "cannot decide"


# ----------------------------------------------------------------------------- frontier

def test_frontier(grid):
    fr = report.frontier(report.collect(grid))
    assert len(fr) == len(PRECISIONS) * len(SOFTMAXES) * len(WARMUPS) * len(CLIPS)

    def row(**kv):
        return _cell(fr, **kv)

    x = row(precision="bf16", softmax="naive", warmup_steps=0, clip=0.0)
    assert (x["max_ok_lr"], x["min_nonfinite_lr"], x["min_failed_lr"]) == (1e-4, 1e-3, 1e-3)
    assert x["monotone"]
    x = row(precision="bf16", softmax="stable", warmup_steps=0, clip=0.0)
    assert (x["max_ok_lr"], x["min_nonfinite_lr"]) == (1e-3, 1e-2)
    x = row(precision="bf16", softmax="stable", warmup_steps=0, clip=1.0)
    assert (x["max_ok_lr"], x["min_nonfinite_lr"], x["min_failed_lr"]) == (1e-4, 1e-2, 1e-3)
    x = row(precision="fp32", softmax="naive", warmup_steps=0, clip=0.0)   # 1e-4 had an error
    assert math.isnan(x["max_ok_lr"]) and x["min_nonfinite_lr"] == 1e-3
    x = row(precision="fp32", softmax="naive", warmup_steps=0, clip=1.0)
    assert (x["max_ok_lr"], x["min_nonfinite_lr"]) == (1e-3, 1e-2)
    x = row(precision="fp32", softmax="stable", warmup_steps=10, clip=0.0)  # 1e-4 diverges
    assert (x["max_ok_lr"], x["min_nonfinite_lr"]) == (1e-3, 1e-2)
    assert x["min_failed_lr"] == 1e-4 and not x["monotone"]


# ----------------------------------------------------------------------------- CLI

def test_cli_subprocess_and_no_torch(grid, tmp_path):
    out = tmp_path / "cli"
    p = subprocess.run([PY, "-m", "src.report", str(grid), "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stderr + p.stdout
    assert "Verdicts" in p.stdout
    assert (out / "results.parquet").exists() and (out / "nan_map.png").exists()
    code = ("import sys, src.report; "
            "heavy = [m for m in ('torch', 'transformers', 'hydra', 'omegaconf', 'lightning')"
            " if m in sys.modules]; print('HEAVY', heavy); sys.exit(1 if heavy else 0)")
    p = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       check=False)
    assert p.returncode == 0, p.stdout + p.stderr


def test_cli_no_records(tmp_path):
    assert report.main([str(tmp_path)]) == 2
