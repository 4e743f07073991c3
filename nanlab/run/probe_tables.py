"""The probe's tables for people: the per-job summary and a sweep's combined verdict
(which setting makes each failing sample finite). Reads what nanlab/probe.py wrote; no torch.

    python -m src.probe --combine outputs/probe_sweeps/<time>
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from nanlab.record import short

TABLE = "samples"  # samples.parquet / samples.csv in each job's dir
SETTINGS = "probe.json"
AXES = ("precision", "softmax", "padding_side", "stress")  # what a probe sweep varies


def _buckets(values):
    """A property's values as a few labelled groups: its own values when they are few
    integers, else quartiles."""
    import pandas as pd

    few = values.nunique(dropna=False) <= 6
    if few and (values.dtype.kind in "iub" or values.nunique(dropna=False) <= 2):
        return values.astype(str)
    try:
        return pd.qcut(values, 4, duplicates="drop", precision=3).astype(str)
    except (ValueError, TypeError):
        return values.astype(str)


def _console():
    from rich.console import Console

    # a file or a pipe gets wide tables rather than rich's 80-column default
    return Console(width=None if sys.stdout.isatty() else 160)


def print_summary(table, settings: dict, show: int = 20) -> None:
    from rich.table import Table

    console = _console()
    n, bad = len(table), int(table["nonfinite"].sum())
    cell = " ".join(
        f"{k}={settings[k]}" for k in ("precision", "softmax", "padding_side", "stress")
    )
    console.print(
        f"[bold]probe[/bold] {settings['checkpoint']} ({settings['split']}, "
        f"{n} samples, batch_size={settings['batch_size']}): {cell}"
    )
    colour = "red" if bad else "green"
    console.print(f"[{colour}]{bad} of {n} samples non-finite[/{colour}]")
    console.print(settings["verdict"], markup=False)
    disagree = table["batch_nonfinite"].notna() & (
        table["batch_nonfinite"].astype(bool) != table["nonfinite"].astype(bool)
    )
    if disagree.any():
        console.print(
            f"[yellow]{int(disagree.sum())} samples differ between the batched "
            "forward and the row alone[/yellow]"
        )
    failing = table[table["nonfinite"].astype(bool)]
    if bad:
        by_module = Table(title="first non-finite module")
        for col in ("module", "tower", "layer", "part", "dtype", "samples"):
            by_module.add_column(col)
        groups = failing.assign(m=failing["first_module"].map(short)).fillna(
            {"first_dtype": "-", "first_part": "logits"}
        )
        counts = (
            groups.groupby(
                ["m", "first_tower", "first_layer", "first_part", "first_dtype"], dropna=False
            )
            .size()
            .sort_values(ascending=False)
        )
        for (m, tower, layer, part, dtype), count in counts.items():
            layer = "-" if layer is None or math.isnan(layer) else str(int(layer))
            by_module.add_row(m, str(tower), layer, str(part), str(dtype), str(count))
        console.print(by_module)
    by_prop = Table(title="non-finite by property")
    for col in ("property", "value", "samples", "non-finite", "rate"):
        by_prop.add_column(col)
    for prop in ("num_pad", "seq_len", "n_image_tokens", "pixel_max", "max_attn_logit"):
        groups = table.groupby(_buckets(table[prop]), sort=True)["nonfinite"]
        for value, g in groups:
            k = int(g.astype(bool).sum())
            by_prop.add_row(prop, str(value), str(len(g)), str(k), f"{k / len(g):.0%}")
    console.print(by_prop)
    if bad:
        listed = Table(title=f"non-finite samples (first {min(show, bad)} of {bad})")
        for col in ("id", "num_pad", "seq_len", "image tokens", "first module", "max attn logit"):
            listed.add_column(col)
        for _, r in failing.head(show).iterrows():
            listed.add_row(
                str(r["id"]),
                str(r["num_pad"]),
                str(r["seq_len"]),
                str(r["n_image_tokens"]),
                short(r["first_module"]),
                f"{r['max_attn_logit']:.4g}",
            )
        console.print(listed)


# --- combining a sweep --------------------------------------------------------------------


def collect(sweep_dir: str | Path):
    """Every job's table under sweep_dir, with its settings as columns (one long table)."""
    import pandas as pd

    frames = []
    for settings_path in sorted(Path(sweep_dir).rglob(SETTINGS)):
        table_path = settings_path.with_name(f"{TABLE}.parquet")
        if not table_path.is_file():
            continue
        settings = json.loads(settings_path.read_text())
        table = pd.read_parquet(table_path)
        for axis in AXES:
            table[axis] = settings[axis]
        table["job"] = str(settings_path.parent.relative_to(sweep_dir))
        frames.append(table.dropna(axis=1, how="all"))  # e.g. first_module when all finite
    if not frames:
        raise ValueError(f"{sweep_dir}: no probe tables ({TABLE}.parquet) under it")
    return pd.concat(frames, ignore_index=True)


def combine(sweep_dir: str | Path, quiet: bool = False):
    """For the samples non-finite in some job: under which settings they are finite.
    Writes combined.parquet (every job's rows) and fixes.csv (failing sample x setting)."""
    sweep_dir = Path(sweep_dir)
    long = collect(sweep_dir)
    varied = [a for a in AXES if long[a].nunique() > 1] or ["softmax"]
    long["setting"] = long[varied].apply(lambda r: " ".join(f"{a}={r[a]}" for a in varied), axis=1)
    long.to_parquet(sweep_dir / "combined.parquet", index=False)
    bad = long["nonfinite"].astype(bool)
    failing_ids = sorted(long.loc[bad, "id"].unique())
    # True: finite under that setting; empty: the sample was not in that job
    wide = (
        long.assign(finite=~bad)[long["id"].isin(failing_ids)]
        .pivot_table(index="id", columns="setting", values="finite", aggfunc="all")
        .reindex(failing_ids)
    )
    settings = list(wide.columns)
    wide["finite_under"] = wide.apply(
        lambda r: "; ".join(s for s in settings if r[s] == 1) or "none", axis=1
    )
    wide.to_csv(sweep_dir / "fixes.csv")
    if not quiet:
        _print_combined(long, wide, settings, failing_ids)
    return wide


def _print_combined(long, wide, settings, failing_ids) -> None:
    from rich.table import Table

    console = _console()
    jobs = long.groupby("setting").agg(samples=("id", "size"), nonfinite=("nonfinite", "sum"))
    t = Table(title=f"probe sweep: {len(failing_ids)} samples non-finite under some setting")
    for col in ("setting", "samples", "non-finite", "failing samples finite here"):
        t.add_column(col)
    for s in settings if failing_ids else jobs.index:
        fixed = int(wide[s].eq(True).sum()) if failing_ids else 0
        t.add_row(
            s,
            str(jobs.loc[s, "samples"]),
            str(int(jobs.loc[s, "nonfinite"])),
            f"{fixed} of {len(failing_ids)}",
        )
    console.print(t)
    if failing_ids:
        per = Table(title="failing samples: the settings that make them finite")
        per.add_column("id")
        per.add_column("finite under")
        for sample_id, r in wide.head(30).iterrows():
            per.add_row(str(sample_id), r["finite_under"])
        console.print(per)
