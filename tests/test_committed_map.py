"""The committed map (experiments/results/cpu-tiny/) is the output of the current code.

* Every row of results.csv: composing its recorded overrides with today's conf/ and
  src.train gives the same config hash (and cell). A change to a default, a config group or
  the hashed keys makes the committed map stale: rerun it (COMMAND.md there) and commit.
* report.md is what today's src.report makes of that results.csv (from the mechanisms on).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from nanlab import report

MAP = Path(__file__).resolve().parents[1] / "experiments" / "results" / "cpu-tiny"
CSV = MAP / "results.csv"
NEEDED = ("overrides", "config_hash")


def _overrides(raw) -> list[str]:
    if not isinstance(raw, str) or not raw.strip():
        return []
    return json.loads(raw) if raw.lstrip().startswith("[") else raw.split()


@pytest.fixture(scope="module")
def committed() -> pd.DataFrame:
    assert CSV.exists(), f"{CSV} is missing: the committed map must be in the repository"
    df = pd.read_csv(CSV)
    missing = [c for c in NEEDED if c not in df.columns]
    assert not missing, f"{CSV} lacks the column(s) {missing}: regenerate the map"
    assert len(df), f"{CSV} has no rows"
    return df


@pytest.mark.slow
def test_committed_map_hashes_match_the_current_config(committed):
    """Each row's config hash from its overrides. Composing takes ~0.2 s, so each cell (the
    overrides but `seed=`) is composed once with compose_spec, and its other seeds are
    hashed by src.train.config_hash from that config with their `seed` (all a `seed=N`
    override changes); the cell hash is compared on every row."""
    from hydra.errors import HydraException

    from nanlab.config.compose import compose_spec, config_hash

    stale, composed = [], {}
    for row in committed.itertuples():
        overrides = _overrides(row.overrides)
        seeds = [o for o in overrides if o.startswith("seed=")]
        key = tuple(o for o in overrides if not o.startswith("seed="))
        if key not in composed:
            try:
                composed[key] = (compose_spec(*overrides), seeds)
            except (HydraException, ValueError, OSError) as e:  # a group or key that is gone
                composed[key] = (None, str(e).splitlines()[0])
        spec, first_seeds = composed[key]
        if spec is None:
            stale.append(f"{' '.join(overrides)}: no longer composes: {first_seeds}")
            continue
        if seeds == first_seeds:
            now = spec.config_hash
        else:
            seed = int(seeds[-1].split("=", 1)[1]) if seeds else spec.seed
            now = config_hash({**spec.config, "seed": seed})
        cell = getattr(row, "cell", None)
        if now != str(row.config_hash) or (isinstance(cell, str) and cell and spec.cell != cell):
            stale.append(f"{' '.join(overrides)}: committed {row.config_hash}, now {now}")
    assert not stale, (
        f"{len(stale)} of {len(committed)} rows of {CSV} no longer match the "
        "config they were run with; rerun the map (see COMMAND.md):\n" + "\n".join(stale[:10])
    )


def test_committed_report_is_what_the_report_code_makes_of_it(committed):
    md = (MAP / "report.md").read_text()
    assert report.RULES in md, "report.md was not written by the current src.report"
    df = report.load_results(CSV)
    a = report.analyze(df)
    fresh = report.markdown.render(
        df,
        a.cells,
        a.mechanisms,
        a.advice,
        a.range_pairs,
        a.frontier,
        report.write.NAMES,
        a.sensitivity,
    )
    cut = "## Mechanisms"
    assert fresh[fresh.index(cut) :].strip() == md[md.index(cut) :].strip(), (
        "report.md differs from what src.report makes of results.csv: rerun "
        "`make report` and commit it"
    )
