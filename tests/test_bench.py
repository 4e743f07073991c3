"""The wrapper comparison of `make bench` (experiments/bench_wrappers.py)."""

import math

import pytest

from experiments import bench_wrappers as w


def fake(speeds: dict[str, float], losses: dict[str, float] | None = None) -> w.Result:
    """A Result whose configs run at `speeds` x the bare loop (wall and CPU alike)."""
    per_step = {name: [(0.2 / s, 0.1 / s)] * 3 for name, s in speeds.items()}
    return w.Result(per_step, losses or dict.fromkeys(speeds, 5.0))


def test_table_says_pass_and_miss_against_each_target():
    text = w.table(
        fake(
            {
                w.BARE: 1.0,
                w.OFF: 1.0,
                w.ON: 0.9,
                w.FOREACH: 0.8,
                w.HF_OOB: 0.5,
                w.HF_OWN: 0.6,
                w.HF: 0.85,
            }
        ),
        3,
        10,
    )
    rows = {line.split("  ")[0]: line for line in text.splitlines()}
    assert rows["monitor on / monitor off"].split()[-4:] == ["0.900x", "MISS", "0.900x", "MISS"]
    assert rows["src.train default / Trainer out of the box"].split()[-4:] == [
        "1.800x",
        "PASS",
        "1.800x",
        "PASS",
    ]
    assert rows["src.train default / bare loop (same optimizer)"].endswith("MISS")
    # the rows without a target give the number only
    assert rows["fused AdamW / foreach AdamW (src.train)"].split()[-3:] == ["-", "1.125x", "1.125x"]
    assert "the same computation in all configs" in text


def test_table_flags_configs_that_train_differently():
    text = w.table(
        fake(dict.fromkeys(w.CONFIGS, 1.0), {**dict.fromkeys(w.CONFIGS, 5.0), w.HF: 5.5}), 3, 10
    )
    assert "DIFFERENT" in text


@pytest.mark.slow
def test_quick_comparison_runs_all_configs_on_the_same_computation():
    res = w.compare(steps=2, rounds=1, warmup=1, log=lambda line: None)
    assert list(res.per_step) == list(w.CONFIGS)
    for name in w.CONFIGS:
        for clock in (0, 1):
            ratio = res.speed(name, w.BARE, clock)
            assert math.isfinite(ratio) and ratio > 0, (name, clock, ratio)
    losses = list(res.last_loss.values())
    assert all(math.isfinite(x) for x in losses)
    # same init, batches, loss and optimizer: the same numbers (fp32, one thread); fused and
    # foreach AdamW round differently in the last bits
    assert max(losses) - min(losses) <= 1e-5 * abs(losses[0]), res.last_loss
    text = w.table(res, 1, 2)
    assert all(name in text for name in w.CONFIGS)
    scored = [t for t in w.TARGETS if t[3] is not None]
    assert text.count("PASS") + text.count("MISS") == 2 * len(scored)
