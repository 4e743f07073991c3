"""record.json: a few sections, every field in exactly one, read back as the flat Record."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

from helpers import spec
from nanlab.record import SECTIONS, Record, read_record, write_record


def test_every_field_is_in_exactly_one_section():
    placed = Counter(k for keys in SECTIONS.values() for k in keys)
    names = {f.name for f in dataclasses.fields(Record)}
    assert set(placed) == names, f"unplaced: {names - set(placed)}, unknown: {set(placed) - names}"
    assert all(n == 1 for n in placed.values()), [k for k, n in placed.items() if n > 1]


def test_written_in_sections_read_back_flat(tmp_path):
    rec = Record(
        status="nonfinite",
        cause="masked_row",
        first_bad_step=3,
        test_failing_ids=["a"],
        config={"lr": 0.1},
        seed=2,
        lr=0.1,
    )
    path = write_record(rec, tmp_path)
    raw = json.loads(path.read_text())
    assert set(raw) == set(SECTIONS)
    assert raw["outcome"]["status"] == "nonfinite" and raw["cause"]["cause"] == "masked_row"
    assert raw["config"]["seed"] == 2 and raw["provenance"]["config"] == {"lr": 0.1}
    assert read_record(path) == rec


def test_an_older_flat_record_still_reads(tmp_path):
    flat = dataclasses.asdict(Record(status="ok", final_loss=1.5, lr=0.3))
    (tmp_path / "record.json").write_text(json.dumps(flat))
    assert read_record(tmp_path / "record.json") == Record(status="ok", final_loss=1.5, lr=0.3)


def test_from_spec_takes_the_axes_and_identity_from_the_spec():
    s = spec("precision=fp16", "softmax=naive", "lr_x=0.1", "seed=3", "stress=lr_spike")
    rec = Record.from_spec(s, "/runs/x")
    assert (rec.precision, rec.softmax, rec.seed, rec.stress) == ("fp16", "naive", 3, "lr_spike")
    assert rec.lr == s.optim.lr and abs(rec.lr_x - 0.1) < 1e-12
    assert (rec.config_hash, rec.cell, rec.run_dir) == (s.config_hash, s.cell, "/runs/x")
    assert rec.status == "error"  # nothing ran yet: a crash before the outcome says error
