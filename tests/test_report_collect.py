"""src.report's plumbing: records -> results table (duplicates, round trips), override
matching, cells, the frontier."""

from __future__ import annotations

import json
import math
import os

import pandas as pd
import pytest
from test_report_builders import BASE, config_for, failing, ok, run, seeds, stalled

from nanlab import report
from nanlab.record import Record, write_record
from nanlab.report import match

# --------------------------------------------------------------------------- collect


def _rec(tmp_path, sub, status, mtime, **kw):
    p = write_record(
        Record(
            precision="bf16",
            softmax="naive",
            lr=1e-3,
            seed=0,
            status=status,
            config_hash="same",
            cell="c",
            **kw,
        ),
        tmp_path / sub,
    )
    os.utime(p, (mtime, mtime))
    return p


def test_duplicates_keep_the_newest_non_interrupted(tmp_path):
    _rec(tmp_path, "a", "nonfinite", 1_000, first_bad_step=3)
    _rec(tmp_path, "b", "ok", 2_000)
    newest = _rec(tmp_path, "c", "interrupted", 3_000, signal="SIGTERM")
    df = report.collect(tmp_path)
    assert len(df) == 1 and df.attrs["duplicates_dropped"] == 2
    assert df.iloc[0]["status"] == "ok"  # the interrupted one is newer, not evidence
    os.utime(tmp_path / "a" / "record.json", (4_000, 4_000))
    assert report.collect(tmp_path).iloc[0]["status"] == "nonfinite"
    for sub in ("a", "b"):
        (tmp_path / sub / "record.json").unlink()
    df = report.collect(tmp_path)  # only an interrupted record: kept, shown
    assert list(df["status"]) == ["interrupted"] and df.iloc[0]["record_path"] == str(newest)


def test_records_without_hash_are_never_duplicates(tmp_path):
    for sub in ("a", "b"):
        write_record(Record(status="ok"), tmp_path / sub)
    assert len(report.collect(tmp_path)) == 2


def test_results_round_trip_csv_and_parquet(tmp_path):
    spec_cfg = config_for(None, ["precision=fp32", "lr_x=3", "data.max_length=null"])
    seeds(tmp_path / "runs", spec_cfg, failing(2, 7, "exp_overflow", 0.25) + ok(1))
    df = report.collect(tmp_path / "runs")
    report.write_results(df, tmp_path / "out")
    for name in ("results.parquet", "results.csv"):
        back = report.load_results(tmp_path / "out" / name)
        assert len(back) == 3
        assert {
            "config",
            "overrides",
            "cell",
            "config_hash",
            "cause",
            "nonfinite_param_frac",
            "first_bad_step",
        } <= set(back.columns)
        cfg = report.run_config(back.iloc[0])
        assert cfg["data"]["max_length"] is None and cfg["precision"]["name"] == "fp32"
        assert json.loads(back.iloc[0]["overrides"])[0].startswith("seed=")
        [c] = report.build_cells(back)
        assert (c.n_seeds, c.n_nonfinite, c.n_ok, c.median_bad_step) == (3, 2, 1, 7.0)
        assert c.median_param_frac == pytest.approx(0.25)
        assert c.causes == {"exp_overflow": 2}
    # the folder works too (parquet preferred)
    assert len(report.load_results(tmp_path / "out")) == 3


def test_old_space_joined_overrides_are_read(tmp_path):
    df = pd.DataFrame(
        [
            {
                "precision": "bf16",
                "status": "ok",
                "seed": 0,
                "overrides": "precision=bf16 lr=0.1 seed=0",
            }
        ]
    )
    out = report.normalize_results(df)
    assert json.loads(out.iloc[0]["overrides"]) == ["precision=bf16", "lr=0.1", "seed=0"]
    assert out.iloc[0]["config"] == "{}"


def test_cells_without_cell_field_fall_back_to_config(tmp_path):
    cfg = config_for(None, [])
    for seed in (0, 1):
        write_record(
            Record(status="ok", seed=seed, config={**cfg, "seed": seed}, config_hash=f"h{seed}"),
            tmp_path / str(seed),
        )
    [c] = report.build_cells(report.collect(tmp_path))
    assert c.n_seeds == 2 and c.key.startswith("cfg:")


# --------------------------------------------------------------------------- matching


@pytest.mark.parametrize(
    "override, expected",
    [
        ("precision=bf16", True),
        ("precision=fp32", False),  # a group: its name
        ("lr_x=1", True),
        ("lr_x=1.0", True),
        ("lr_x=10", False),  # numbers numerically
        ("data.padding_side=right", True),
        ("data.padding_side=left", False),
        ("data.max_length=null", True),
        ("data.max_length=40", False),  # null is None
        ("data.normalize=true", True),
        ("data.normalize=1", False),  # a bool is a bool
        ("clip=1", True),
        ("+clip=1.0", True),
        ("nope.key=1", False),
    ],
)
def test_override_matching(override, expected):
    assert report.matches(BASE, override) is expected


def test_equal_except_touches_group_subtrees_and_leaves():
    a = config_for(None, ["precision=bf16"])
    b = config_for(None, ["precision=progressive", "precision.switch_step=2"])
    assert report.equal_except(a, b, ["precision"])
    assert not report.equal_except(a, b, ["precision.switch_step"])  # the name differs too
    c = config_for(None, ["data.padding_side=left"])
    assert report.equal_except(BASE, c, ["data.padding_side"])
    assert not report.equal_except(BASE, c, ["data.normalize"])
    assert report.equal_except(BASE, {**BASE, "seed": 7}, [])  # never the seed


def test_updated_overrides():
    assert match.updated(["precision=bf16", "lr_x=10"], ["lr_x=1", "clip=0.1"]) == [
        "precision=bf16",
        "lr_x=1",
        "clip=0.1",
    ]


# --------------------------------------------------------------------------- frontier


def test_frontier_lines_from_core_cells(tmp_path):
    grid = {  # (precision, lr_x) -> outcomes of 3 seeds
        ("bf16", 1): ok(3),
        ("bf16", 3): ok(3),
        ("bf16", 10): failing(1, 4, "x") + ok(2),
        ("bf16", 30): failing(3, 2, "x"),
        ("fp32", 1): stalled(1) + ok(2),
        ("fp32", 3): failing(1, 9, "x") + ok(2),
        ("fp32", 10): ok(3),
    }
    for (p, x), outs in grid.items():
        seeds(tmp_path, config_for(None, [f"precision={p}", f"lr_x={x}"]), outs)
    # a stressed cell is not core
    run(tmp_path, config_for({"name": "other"}, ["lr_x=100"]), 0, "ok")
    ls = report.lines(report.build_cells(report.collect(tmp_path)))
    got = {ln.precision: ln for ln in ls}
    assert set(got) == {"bf16", "fp32"}
    assert [x for x, _ in got["bf16"].points] == [1, 3, 10, 30]
    assert (got["bf16"].max_ok, got["bf16"].min_failed, got["bf16"].monotone) == (3, 10, True)
    # fp32: every seed ok only at 10; a seed failed at 3 -> not monotone
    assert (got["fp32"].max_ok, got["fp32"].min_failed, got["fp32"].monotone) == (10, 3, False)
    fr = report.frontier_frame(ls)
    assert list(fr["precision"]) == ["fp32", "bf16"]  # fp32 first, as in the map
    assert list(fr["seeds"])[1] == "3/3 3/3 2/3 0/3"


def test_fmt_lr():
    assert [report.fmt_lr(x) for x in (1e-4, 2.5e-5, 0.3, 10, None)] == [
        "1e-4",
        "2.5e-5",
        "0.3",
        "10",
        "",
    ]
    assert report.fmt_lr(math.nan) == ""
