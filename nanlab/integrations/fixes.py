"""From cause to fix: what the committed map measured for each cause, shipped inside the
package (fixes_table.py beside this file: a Python module, so it ships with the package with
no package-data setting) so a user's own run gets it offline.

The table is written from a report's verdicts.csv (nanlab/report: one row per mechanism x
prediction) by `write_fixes(verdicts_csv)`: only rows the report counts (`counts` true) whose
measured effect is `fixes`, with the seeds that trained finite (or, for test-time
mechanisms, served finite). The committed one comes from
experiments/results/cpu-tiny/verdicts.csv (tests/test_integrations_fixes.py checks it
against that file); after the map is regenerated:

    python -m nanlab.integrations.fixes experiments/results/cpu-tiny/verdicts.csv

Wording: "fixed on the tiny-model map (cpu-tiny, 20 steps)": a measurement on the project's
tiny model and short runs, not a promise for a user's model.
"""

from __future__ import annotations

import ast
import csv
import pprint
from pathlib import Path

TABLE = Path(__file__).with_name("fixes_table.py")
MAP = "cpu-tiny"
MAP_STEPS = 20


def rows_from_verdicts(verdicts_csv) -> list[dict]:
    """The counted `fixes` rows of a verdicts.csv, one per (cause, mitigation, where): a
    mechanism whose cause reads "a or b" gives a row for each."""
    rows = []
    with open(verdicts_csv, newline="") as f:
        for r in csv.DictReader(f):
            if r["measured"] != "fixes" or r["counts"] != "True":
                continue
            for cause in r["cause"].split(" or "):
                rows.append(
                    {
                        "cause": cause.strip(),
                        "mitigation": r["mitigation"],
                        "seeds_ok": int(r["seeds_ok"]),
                        "seeds": int(r["seeds"]),
                        "judged_on": r["judged_on"],
                    }
                )
    return rows


def write_fixes(verdicts_csv, out=TABLE, map_name: str = MAP, steps: int = MAP_STEPS) -> Path:
    out = Path(out)
    table = {
        "map": map_name,
        "steps": steps,
        "source": Path(verdicts_csv).name,
        "fixes": rows_from_verdicts(verdicts_csv),
    }
    out.write_text(
        '"""What the map measured as fixes per cause: written by '
        'nanlab.integrations.fixes.write_fixes from its verdicts.csv; do not edit."""\n'
        f"TABLE = {pprint.pformat(table, width=96, sort_dicts=False)}\n"
    )
    return out


def load(path=TABLE) -> dict:
    try:
        text = Path(path).read_text()
        return ast.literal_eval(text.split("TABLE = ", 1)[1])
    except (OSError, ValueError, IndexError, SyntaxError):
        return {"fixes": []}


def fix_line(cause: str | None, judged_on: str = "training", table: dict | None = None) -> str:
    """One sentence for a verdict: 'masked_row -> fixed on the tiny-model map (cpu-tiny,
    20 steps) by softmax=sdpa (3/3 seeds), ...', or '' when the map measured none."""
    if not cause:
        return ""
    table = table or load()
    seen, parts = set(), []
    for r in table["fixes"]:
        if r["cause"] == cause and r["judged_on"] == judged_on and r["mitigation"] not in seen:
            seen.add(r["mitigation"])
            parts.append(f"{r['mitigation']} ({r['seeds_ok']}/{r['seeds']} seeds)")
    if not parts:
        return ""
    return (
        f" {cause} -> fixed on the tiny-model map ({table.get('map', MAP)}, "
        f"{table.get('steps', MAP_STEPS)} steps) by {', '.join(parts)}."
    )


if __name__ == "__main__":  # python -m nanlab.integrations.fixes <committed map>/verdicts.csv
    import sys

    print(
        write_fixes(
            sys.argv[1]
            if len(sys.argv) > 1
            else Path(__file__).resolve().parents[2]
            / "experiments"
            / "results"
            / MAP
            / "verdicts.csv"
        )
    )
