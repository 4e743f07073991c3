"""The fixes table shipped in the package (nanlab/integrations/fixes_table.py) is the
committed map's verdicts.csv, and every verdict paragraph ends with it."""

from __future__ import annotations

from helpers import ROOT
from nanlab.integrations import fixes
from nanlab.record import Record

VERDICTS = ROOT / "experiments" / "results" / "cpu-tiny" / "verdicts.csv"


def test_the_shipped_table_is_the_committed_maps(tmp_path):
    shipped = fixes.load()
    assert shipped["fixes"] == fixes.rows_from_verdicts(VERDICTS)
    assert (shipped["map"], shipped["steps"]) == ("cpu-tiny", 20)
    again = fixes.load(fixes.write_fixes(VERDICTS, tmp_path / "t.py"))
    assert again == shipped


def test_only_counted_fixes_are_in_it():
    rows = fixes.rows_from_verdicts(VERDICTS)
    masked = {
        r["mitigation"] for r in rows if r["cause"] == "masked_row" and r["judged_on"] == "training"
    }
    assert {"softmax=sdpa", "data.padding_side=right"} <= masked
    assert "precision=fp32" not in masked and "lr_x=0.1" not in masked  # no_effect on the map
    # a mechanism that does not count (logit_growth: its control fails too) gives no row
    assert not any(r["cause"] in ("exp_overflow", "exp_underflow") for r in rows)


def test_a_mechanism_with_two_causes_gives_both(tmp_path):
    import csv

    with open(VERDICTS, newline="") as f:
        reader = csv.DictReader(f)
        names, rows = reader.fieldnames, list(reader)
    row = {
        **rows[0],
        "cause": "exp_overflow or exp_underflow",
        "measured": "fixes",
        "counts": "True",
    }
    with open(tmp_path / "v.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=names)
        w.writeheader()
        w.writerow(row)
    assert {r["cause"] for r in fixes.rows_from_verdicts(tmp_path / "v.csv")} == {
        "exp_overflow",
        "exp_underflow",
    }


def test_verdicts_end_with_what_the_map_measured():
    rec = Record(
        status="nonfinite",
        cause="masked_row",
        first_bad_step=0,
        phase="forward",
        precision="bf16",
        softmax="eager",
        lr=0.3,
    )
    text = rec.verdict()
    assert text.endswith("(3/3 seeds), stress.mask=transformers (3/3 seeds).")
    assert "masked_row -> fixed on the tiny-model map (cpu-tiny, 20 steps) by " in text
    assert "softmax=sdpa (3/3 seeds)" in text and "data.padding_side=right (3/3 seeds)" in text
    assert fixes.fix_line("unknown") == "" and fixes.fix_line(None) == ""
