"""The pipeline: records -> results table -> cells -> verdicts -> frontier -> files.

Writes into OUT: results.parquet / .csv (one row per run), cells.csv, verdicts.csv (one row
per mechanism x prediction), frontier.csv, lr_sensitivity.csv (one row per LR family),
matrix.png, frontier.png, nan_map.png, lr_sensitivity.png, report.md.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .cells import OUTCOME_TEXT, OUTCOMES, Cell, build_cells, cells_frame
from .collect import collect, write_results
from .figures import draw_frontier, draw_matrix, draw_sensitivity
from .frontier import Line, frontier_frame, lines
from .markdown import render
from .nanmap import draw_map
from .sensitivity import Family, by_group, families, ranking_lines, sensitivity_frame
from .summary import AdviceLine, RangePairs, advice_lines, pairs_frame, range_pairs
from .verdicts import Mechanism, mechanisms

NAMES = {
    "matrix": "matrix.png",
    "frontier": "frontier.png",
    "map": "nan_map.png",
    "sensitivity": "lr_sensitivity.png",
}


@dataclass
class Analysis:
    df: pd.DataFrame
    cells: list[Cell]
    mechanisms: list[Mechanism]
    advice: list[AdviceLine]
    range_pairs: RangePairs
    frontier: list[Line]
    sensitivity: list[Family] = field(default_factory=list)  # LR families (sensitivity.py)

    def verdicts(self) -> pd.DataFrame:
        return pairs_frame(self.mechanisms)

    def cells_frame(self) -> pd.DataFrame:
        return cells_frame(self.cells)

    def frontier_frame(self) -> pd.DataFrame:
        return frontier_frame(self.frontier)

    def sensitivity_frame(self) -> pd.DataFrame:
        return sensitivity_frame(self.sensitivity)


def analyze(df: pd.DataFrame) -> Analysis:
    """The results table (from collect() or load_results()) -> every analysis."""
    cells = build_cells(df)
    mechs = mechanisms(cells)
    return Analysis(
        df, cells, mechs, advice_lines(mechs, cells), range_pairs(cells), lines(cells), families(df)
    )


def write_report(
    dirs: Sequence[str | os.PathLike] | str | os.PathLike,
    out: str | os.PathLike | None = None,
    wandb: str = "off",
    console=None,
) -> Path:
    """Collect the records below `dirs` and write every output into `out` (default: the
    first dir). Returns the path of report.md."""
    roots = [Path(dirs)] if isinstance(dirs, (str, os.PathLike)) else [Path(d) for d in dirs]
    target = Path(out) if out is not None else roots[0]
    say = console.print if console is not None else (lambda *a, **k: None)
    df = collect(*roots, progress=console is not None)
    if df.empty:
        raise FileNotFoundError(f"no record.json below {', '.join(map(str, roots))}")
    target.mkdir(parents=True, exist_ok=True)
    write_results(df, target)
    dropped = df.attrs["duplicates_dropped"]
    say(
        f"[bold]{len(df)}[/] runs from {len(roots)} dir(s)"
        + (
            f", [yellow]{dropped} duplicate(s) dropped[/] (newest non-interrupted kept)"
            if dropped
            else ""
        )
    )
    a = analyze(df)
    a.cells_frame().to_csv(target / "cells.csv", index=False)
    a.verdicts().to_csv(target / "verdicts.csv", index=False)
    a.frontier_frame().to_csv(target / "frontier.csv", index=False)
    a.sensitivity_frame().to_csv(target / "lr_sensitivity.csv", index=False)
    draw_matrix(a.mechanisms, target / NAMES["matrix"])
    draw_frontier(a.frontier, target / NAMES["frontier"])
    draw_map(a.cells, target / NAMES["map"])
    draw_sensitivity(a.sensitivity, target / NAMES["sensitivity"])
    md = target / "report.md"
    md.write_text(
        render(df, a.cells, a.mechanisms, a.advice, a.range_pairs, a.frontier, NAMES, a.sensitivity)
    )
    if console is not None:
        print_summary(console, a)
    if wandb != "off":
        log_wandb(target, a, mode=wandb)
        say(f"W&B ({wandb}) run written under {target / 'wandb'}")
    say(f"wrote results.parquet, {', '.join(NAMES.values())}, report.md in {target}")
    return md


STYLE = {"agrees": "green", "refutes": "bold red", "disagrees": "bold yellow"}


def print_summary(console, a: Analysis) -> None:
    from rich.markup import escape
    from rich.table import Table

    states = pd.Series([c.outcome for c in a.cells]).value_counts()
    console.print(
        "cells: " + "; ".join(f"{OUTCOME_TEXT[s]} {int(states.get(s, 0))}" for s in OUTCOMES)
    )
    t = Table(title="Verdicts: prediction vs measurement", show_lines=False)
    for col in ("mechanism", "advice", "mitigation", "predicted", "measured", "agreement"):
        t.add_column(col, overflow="fold")
    for m in a.mechanisms:
        for p in m.pairs:
            if p.measured is None:
                verdict = f"[dim]{p.status}[/]"
            elif p.counts:
                verdict = f"[{STYLE.get(p.agreement or '', '')}]{p.agreement}[/]"
            else:
                verdict = f"[dim]{p.agreement} ({p.status})[/]"
            t.add_row(
                m.label + (" (judged at test time)" if m.at_test else ""),
                p.advice,
                p.arm,
                p.predicted,
                p.measured or "-",
                verdict,
            )
    if a.mechanisms:
        console.print(t)
    else:
        console.print("Verdicts: no mechanism runs (stress=...) in these records")
    for line in a.advice:
        if line.line != "not tested by the map":
            console.print(f"[bold]{line.text}[/]: {line.line}", highlight=False)
    if by_group(a.sensitivity):
        console.print(
            "[bold]LR sensitivity[/] (Wortsman et al. 2023; "
            + escape("E_lr[min(l(lr), l0) - l*]")
            + ", lower is better; "
            "lr_sensitivity.csv):"
        )
        for text in ranking_lines(a.sensitivity, top=5):
            console.print(f"  {text}", highlight=False)


def log_wandb(out: Path, a: Analysis, mode: str = "offline", project: str = "nanlab") -> None:
    """One W&B run with the results, cells and verdicts tables and the figures."""
    import wandb  # lazy: heavy, and only needed here

    run = wandb.init(
        project=project,
        job_type="report",
        dir=str(out),
        mode=mode,  # type: ignore[arg-type]
        name=f"report-{out.name}",
        config={"dirs": a.df.attrs.get("dirs", [])},
        settings=wandb.Settings(silent=True),
    )
    try:

        def table(df: pd.DataFrame):
            return wandb.Table(dataframe=df.astype(object).where(df.notna(), None).astype(str))

        run.log(
            {
                "results": table(a.df.drop(columns=["mtime"], errors="ignore")),
                "cells": table(a.cells_frame()),
                "verdicts": table(a.verdicts()),
                "lr_sensitivity": table(a.sensitivity_frame()),
                **{k: wandb.Image(str(out / v)) for k, v in NAMES.items()},
            }
        )
        run.summary.update(
            {"runs": len(a.df), "cells": len(a.cells), "mechanisms": len(a.mechanisms)}
        )
    finally:
        run.finish()
