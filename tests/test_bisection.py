"""The frontier by bisection: the search (hydra_plugins/nanlab_sweeper/bisection.py) as plain
Python against fake oracles, the sweeper (bisection_sweeper.py next to it): its settings and
combinations, and one slow end-to-end sweep through the real entry point."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra.errors import HydraException

from helpers import hydra_cfg
from hydra_plugins.nanlab_sweeper.bisection import (
    Bisection,
    bisect,
    bisect_all,
    dense_runs,
    fmt,
    grid_value,
    is_stable,
)
from hydra_plugins.nanlab_sweeper.bisection_sweeper import BisectionSweeper, free_job_idx
from nanlab.record import read_record
from nanlab.report import collect
from nanlab.sweep.progress import grid_size

ROOT = Path(__file__).resolve().parent.parent


def threshold(t: float, below: str = "ok", above: str = "nonfinite"):
    """A fake run: `below` up to t, `above` past it, for every seed."""
    return lambda x, seed: below if x <= t else above


# --- the search ---------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0.031, 0.05, 0.3, 0.95, 1.0, 2.9, 17.0, 29.0])
def test_known_threshold_is_found_within_one_step(t):
    lo, hi, steps = 0.03, 30.0, 4
    result = bisect(threshold(t), lo, hi, steps, seeds=(0, 1))
    step = (hi / lo) ** (1 / 2**steps)
    assert result["outcome"] == "bracketed"
    assert result["largest_stable"] <= t < result["smallest_unstable"]
    assert result["smallest_unstable"] / result["largest_stable"] == pytest.approx(step, rel=1e-3)
    # it is exactly the largest point of the dense grid at or below t
    grid = [grid_value(lo, hi, i, steps) for i in range(2**steps + 1)]
    assert result["largest_stable"] == max(x for x in grid if x <= t)
    # both ends, then one midpoint per step, each with every seed
    assert result["rounds"] == 1 + steps
    assert result["points"] == 2 + steps and result["runs"] == (2 + steps) * 2


def test_runs_used_against_the_dense_grid_of_the_same_resolution():
    result = bisect(threshold(1.0), 0.03, 30, 4, seeds=(0, 1))
    assert result["runs"] == 12 and result["dense_runs"] == dense_runs(4, 2) == 34
    assert dense_runs(2, 1) == 5 and dense_runs(0, 3) == 6
    # every probe is a point of that grid: the dense grid would have run them too
    grid = {grid_value(0.03, 30, i, 4) for i in range(17)}
    assert {p["value"] for p in result["probes"]} <= grid


def test_lo_unstable_means_the_frontier_is_below_the_range():
    result = bisect(threshold(0.01), 0.03, 30, 4, seeds=(0, 1))
    assert result["outcome"] == "below_range"
    assert result["largest_stable"] is None and result["smallest_unstable"] == 0.03
    assert result["rounds"] == 1 and result["runs"] == 4  # lo and hi, nothing more


def test_hi_stable_means_the_frontier_is_above_the_range():
    result = bisect(threshold(100.0), 0.03, 30, 4, seeds=(0,))
    assert result["outcome"] == "above_range"
    assert result["largest_stable"] == 30 and result["smallest_unstable"] is None
    assert result["rounds"] == 1 and result["runs"] == 2


def test_one_failing_seed_makes_a_point_unstable():
    # seed 1 breaks from 0.5, seed 0 only from 5: the frontier is seed 1's
    def oracle(x, seed):
        return "ok" if x <= (5.0 if seed == 0 else 0.5) else "diverged"

    result = bisect(oracle, 0.03, 30, 4, seeds=(0, 1))
    assert result["largest_stable"] <= 0.5 < result["smallest_unstable"]
    mixed = [p for p in result["probes"] if set(p["statuses"].values()) == {"ok", "diverged"}]
    assert mixed and not any(p["stable"] for p in mixed)
    assert not is_stable(["ok", "nonfinite"]) and is_stable(["ok", "ok"]) and not is_stable([])


def test_stalled_is_not_stable_unless_asked():
    # finite everywhere, but trained only up to 1.0: stalled above
    oracle = threshold(1.0, above="stalled")
    result = bisect(oracle, 0.03, 30, 4)
    assert result["outcome"] == "bracketed"
    assert result["largest_stable"] <= 1.0 < result["smallest_unstable"]
    assert bisect(oracle, 0.03, 30, 4, stable_if=("ok", "stalled"))["outcome"] == "above_range"
    assert not is_stable(["stalled"]) and is_stable(["stalled"], ("ok", "stalled"))


def test_a_missing_seed_counts_as_error_and_unasked_points_are_refused():
    search = Bisection(0.1, 10, 2, seeds=(0, 1))
    assert search.pending() == [0, 4]
    search.observe(0, {0: "ok", 1: "ok"})
    search.observe(4, {0: "nonfinite"})  # seed 1 never came back
    assert search.points[4] == {0: "nonfinite", 1: "error"}
    assert search.pending() == [2]
    with pytest.raises(ValueError):
        search.observe(1, {0: "ok", 1: "ok"})


def test_rounds_batch_every_open_combination_and_its_seeds():
    thresholds = [0.01, 0.5, 3.0, 100.0]  # below, inside, inside, above the range
    searches = [Bisection(0.03, 30, 3, seeds=(0, 1)) for _ in thresholds]
    batches = []

    def evaluate(batch):
        batches.append(batch)
        return [threshold(thresholds[k])(x, s) for k, x, s in batch]

    rounds = bisect_all(searches, evaluate)
    assert rounds == 4
    assert [len(b) for b in batches] == [4 * 2 * 2, 2 * 2, 2 * 2, 2 * 2]
    assert [s.outcome for s in searches] == ["below_range", "bracketed", "bracketed", "above_range"]
    for search, t in zip(searches[1:3], thresholds[1:3]):
        assert search.largest_stable <= t < search.smallest_unstable
    assert sum(s.runs for s in searches) == 4 + 10 + 10 + 4


def test_grid_values_and_their_overrides():
    assert grid_value(0.03, 30, 0, 4) == 0.03 and grid_value(0.03, 30, 16, 4) == 30
    assert grid_value(0.03, 30, 8, 4) == 0.9487  # sqrt(0.03 * 30), 4 digits
    assert [fmt(x) for x in (30.0, 0.03, 0.9487, 1e-5, 1.0)] == [
        "30",
        "0.03",
        "0.9487",
        "1e-05",
        "1",
    ]
    with pytest.raises(ValueError):
        Bisection(1.0, 0.5, 3)
    with pytest.raises(ValueError):
        Bisection(0.1, 1.0, 3, seeds=())


def test_job_numbers_never_land_on_another_runs_record(tmp_path):
    job = ["precision=bf16", "lr_x=1", "seed=0"]
    assert free_job_idx(tmp_path, [job], 0) == 0  # nothing there yet
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "record.json").write_text(json.dumps({"overrides": job[::-1]}))
    (tmp_path / "7").mkdir()
    assert free_job_idx(tmp_path, [job], 0) == 0  # its own dir: reused
    assert free_job_idx(tmp_path, [["precision=bf16", "lr_x=2", "seed=0"]], 0) == 8


# --- the sweeper's settings ------------------------------------------------------------------


def test_combinations_expand_like_the_basic_sweeper():
    sweeper = BisectionSweeper(params={"precision": "fp32,bf16", "softmax": "sdpa,stable"})
    combos, axes = sweeper.split_combinations(["clip=0,1.0", "max_steps=4"])
    assert axes == ["precision", "softmax", "clip"]
    assert len(combos) == 8 and all("max_steps=4" in c for c in combos)
    assert ["precision=bf16", "softmax=stable", "clip=0", "max_steps=4"] in combos
    for bad in (["lr_x=1"], ["seed=0,1"]):
        with pytest.raises(HydraException, match="sets lr_x and seed itself"):
            sweeper.split_combinations(bad)


def test_the_frontier_experiment_composes():
    cfg = hydra_cfg("experiment=frontier_bisection")
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("BisectionSweeper")
    assert cfg.hydra.sweep.dir == "outputs/sweeps/frontier_bisection"
    assert (sweeper.key, sweeper.lo, sweeper.hi, sweeper.steps) == ("lr_x", 0.03, 30, 4)
    assert list(sweeper.seeds) == [0, 1] and list(sweeper.stable_if) == ["ok"]
    assert cfg.max_steps == 20 and cfg.trainer.progress is False  # nan_map_base
    assert grid_size(cfg) is None  # adaptive: the progress line shows no total
    combos, _ = BisectionSweeper(params=dict(sweeper.params)).split_combinations([])
    assert len(combos) == 12


# --- end to end -----------------------------------------------------------------------------


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", "src.train", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_bisection_sweep_end_to_end(tmp_path):
    """bf16 with the naive softmax (no max subtraction): ok at lr_x 0.1, non-finite at the
    first step at lr_x 30; 2 steps, 1 seed: lo, hi and 2 midpoints, one record each."""
    args = [
        "-m",
        "experiment=nan_map_base",
        "hydra/sweeper=bisection",
        "hydra.sweeper.params={precision:bf16,softmax:naive}",
        "hydra.sweeper.lo=0.1",
        "hydra.sweeper.hi=30",
        "hydra.sweeper.steps=2",
        "hydra.sweeper.seeds=[0]",
        "max_steps=4",
        "data.num_train=16",
        "data.num_test=4",
        "serve.enabled=false",
        f"hydra.sweep.dir={tmp_path}",
    ]
    started = time.time()
    proc = cli(*args)
    print(f"bisection, 1 combination, 2 steps, 1 seed: {time.time() - started:.1f} s")
    print(proc.stdout[-1500:])

    doc = json.loads((tmp_path / "frontier_bisection.json").read_text())
    assert (doc["key"], doc["steps"], doc["seeds"]) == ("lr_x", 2, [0])
    [result] = doc["combinations"]
    assert result["combination"] == "precision=bf16 softmax=naive"
    assert result["outcome"] == "bracketed"
    assert result["runs"] == 4 and result["dense_runs"] == 5 and doc["runs"] == 4
    lo, hi = result["bracket"]
    assert 0.1 <= lo < hi <= 30 and hi / lo == pytest.approx(300**0.25, rel=1e-3)
    # the bracket is what the probes say: its ends are the largest stable and the smallest
    # unstable value run, the range's ends among them (ok at 0.1, non-finite at 30)
    probes = {p["value"]: p for p in result["probes"]}
    assert lo == max(x for x, p in probes.items() if p["stable"])
    assert hi == min(x for x, p in probes.items() if not p["stable"])
    assert probes[0.1]["statuses"] == {"0": "ok"} and probes[30]["statuses"] == {"0": "nonfinite"}

    # one ordinary record per probe, with the probe's lr_x and seed and the status it returned
    records = {p: read_record(p) for p in tmp_path.rglob("record.json")}
    assert len(records) == 4
    for probe in result["probes"]:
        rec = records[tmp_path / probe["records"]["0"]]  # relative to the sweep dir
        assert rec.lr_x == pytest.approx(probe["value"]) and rec.seed == 0
        assert rec.precision == "bf16" and rec.softmax == "naive"
        assert rec.status == probe["statuses"]["0"]
        assert probe["stable"] == (rec.status == "ok")
    assert sorted(collect(tmp_path)["lr_x"]) == sorted(p["value"] for p in result["probes"])

    with (tmp_path / "frontier_bisection.csv").open() as f:
        [row] = list(csv.DictReader(f))
    assert row["precision"] == "bf16" and row["softmax"] == "naive"
    assert float(row["largest_stable"]) == lo and int(row["runs"]) == 4
    assert "frontier precision=bf16 softmax=naive: largest stable lr_x=" in proc.stdout
    assert "4 runs vs 5 dense" in proc.stdout

    # the same sweep again: every probe is read from its record, nothing trains
    again = cli(*args)
    assert len(re.findall(r"cell #\d+ skipped", again.stdout)) == 4 and "skipped 4" in again.stdout
    assert len(list(tmp_path.rglob("record.json"))) == 4
    redo = json.loads((tmp_path / "frontier_bisection.json").read_text())["combinations"][0]
    assert redo["bracket"] == result["bracket"]
    assert [p["statuses"] for p in redo["probes"]] == [p["statuses"] for p in result["probes"]]
