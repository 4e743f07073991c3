"""The report's regime table: medians of the records' regime fields by lr_x."""

from __future__ import annotations

from nanlab import report
from nanlab.record import Record, write_record
from nanlab.report.regime import regime_section


def _rec(tmp_path, i, status, stress="none", **regime):
    rec = Record(
        status=status,
        stress=stress,
        lr=0.3,
        lr_x=1.0,
        ref_lr=0.3,
        seed=i,
        config_hash=f"h{i}",
        cell="c",
        **regime,
    )
    write_record(rec, tmp_path / f"r{i}")


def test_medians_of_finite_unstressed_runs_by_lr_x(tmp_path):
    _rec(tmp_path, 0, "ok", rel_update_first_text=10.0, attn_entropy_last_text=0.1)
    _rec(tmp_path, 1, "stalled", rel_update_first_text=14.0, attn_entropy_last_text=0.3)
    _rec(tmp_path, 2, "nonfinite", rel_update_first_text=1e6)  # not finite: left out
    _rec(tmp_path, 3, "ok", stress="lr_spike", rel_update_first_text=1e6)  # planted: left out
    text = "\n".join(regime_section(report.collect(tmp_path)))
    row = next(line for line in text.splitlines() if line.startswith("| 1 |"))
    assert row.startswith("| 1 | 2 | 1 | 12 / - | - / - | 0.2 / - |"), row
    assert "about 5e-04" in text


def test_no_regime_fields_no_section(tmp_path):
    _rec(tmp_path, 0, "ok")
    assert regime_section(report.collect(tmp_path)) == []
