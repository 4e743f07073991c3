"""Records -> results table, NaN map, verdicts on common advice, stable-lr frontier.

    python -m src.report DIR [DIR ...] [--out OUT] [--wandb {off,offline,online}]

Reads every `record.json` below the given directories (see `src.record`) and nothing else:
no torch, no transformers, no hydra import here, so a map can be drawn on a laptop from a
cluster's results in seconds. Writes into OUT (default: the first DIR):

    results.parquet, results.csv   one row per run (the Record fields + record_path, mtime)
    cells.csv                      one row per cell (all axes but seed; seeds aggregated)
    nan_map.png                    the heatmap
    verdicts.csv, frontier.csv     the two analyses below
    report.md                      totals, rules, verdicts, frontier, cell table

Definitions (also written into report.md):

* A *cell* is a unique combination of the AXES except `seed`; its runs are its seeds.
* Fractions (`frac_nonfinite`, `frac_diverged`, `frac_error`) are over all runs of the cell.
* A cell's *outcome* is the worst status across its seeds, in the order
  error < ok < diverged < nonfinite (an error says nothing about numerics, so a cell is
  `error` only when no seed ran). `median_bad_step` is the median `first_bad_step` of the
  seeds that have the cell's outcome; `module` the most common module where they broke.
* The *failure fraction* used by the verdicts is (nonfinite + diverged) / (runs that did
  not error).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import pandas as pd

from src.record import AXES, STATUSES, Record, find_records, read_record

CELL_AXES: tuple[str, ...] = tuple(a for a in AXES if a != "seed")
# Axes that become facets (subplot panels) of the map when they take more than one value.
FACET_AXES: tuple[str, ...] = ("warmup_steps", "clip", "normalize", "stress", "guard",
                               "model", "data")
STR_AXES = ("precision", "softmax", "stress", "guard", "model", "data")
# worst-last: a cell's outcome is the max over its seeds in this order
SEVERITY = {"error": 0, "ok": 1, "diverged": 2, "nonfinite": 3}
PRECISION_ORDER = ("fp32", "bf16", "bf16_true", "fp16", "progressive")
SOFTMAX_ORDER = ("sdpa", "eager", "naive", "stable", "safe", "softcap")
AXIS_SHORT = {"warmup_steps": "warmup", "normalize": "norm"}

COLORS = {
    "ok": "#5cb85c",
    "diverged": "#f0a030",
    "nonfinite_lo": "#f6b3ae",   # non-finite in few seeds
    "nonfinite_hi": "#b2182b",   # non-finite in every seed
    "error": "#a6a6a6",
    "missing": "#ffffff",
}

RECORD_FIELDS = tuple(f.name for f in fields(Record))


# --------------------------------------------------------------------------- collect

def collect(*dirs: str | os.PathLike, progress: bool = False) -> pd.DataFrame:
    """Every record.json below `dirs` as one DataFrame, one row per run.

    Columns: the Record fields (`overrides` joined by spaces), `record_path`, `mtime`.
    Runs with the same (config_hash, seed) are duplicates (a rerun); the newest record by file
    mtime is kept. How many were dropped is in `df.attrs["duplicates_dropped"]`. Records with
    an empty config_hash are never treated as duplicates.
    """
    paths = find_records(*dirs)
    rows = []
    iterator: Iterable[Path] = paths
    if progress and paths:
        from rich.progress import track
        iterator = track(paths, description="reading records", transient=True)
    for p in iterator:
        rec = read_record(p)
        row = {f: getattr(rec, f) for f in RECORD_FIELDS}
        row["overrides"] = " ".join(str(o) for o in (rec.overrides or []))
        row["record_path"] = str(p)
        row["mtime"] = p.stat().st_mtime
        rows.append(row)
    df = pd.DataFrame(rows, columns=[*RECORD_FIELDS, "record_path", "mtime"])
    n_before = len(df)
    if n_before:
        key = df["config_hash"].fillna("").astype(str)
        key = key.where(key != "", "<nohash>" + df["record_path"])
        df = (df.assign(_key=key + "|seed=" + df["seed"].astype(str))
                .sort_values("mtime", kind="stable")
                .drop_duplicates("_key", keep="last")
                .drop(columns="_key")
                .sort_values("record_path", kind="stable")
                .reset_index(drop=True))
    df = normalize_results(df)
    df.attrs["duplicates_dropped"] = n_before - len(df)
    df.attrs["dirs"] = [str(d) for d in dirs]
    return df


def normalize_results(df: pd.DataFrame) -> pd.DataFrame:
    """Consistent dtypes, whether the table came from records, results.csv or parquet.

    A CSV round trip turns "" into NaN and ints with gaps into floats; grouping on NaN keys
    would silently drop rows, so string axes are filled with "".
    """
    df = df.copy()
    for c in RECORD_FIELDS:
        if c not in df.columns:
            df[c] = getattr(Record(), c) if c != "overrides" else ""
    for c in STR_AXES:
        df[c] = df[c].fillna("").astype(str)
    for c in ("lr", "clip", "final_loss", "best_loss", "max_grad_norm", "max_attn_logit",
              "wall_time_s", "steps_per_s"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    for c in ("warmup_steps", "seed", "loss_spikes", "guard_fired", "scaler_skips",
              "steps_done", "max_steps"):
        df[c] = pd.to_numeric(df[c], errors="coerce").fillna(0).astype("int64")
    df["first_bad_step"] = pd.to_numeric(df["first_bad_step"], errors="coerce").astype("Int64")
    df["normalize"] = df["normalize"].map(_to_bool).astype(bool)
    df["status"] = df["status"].fillna("error").astype(str)
    for c in ("phase", "module", "dtype", "error", "config_hash", "overrides", "run_dir",
              "torch_version", "transformers_version", "device", "half_gemm"):
        df[c] = df[c].astype(object).where(df[c].notna(), None)
    return df


def _to_bool(x) -> bool:
    if isinstance(x, str):
        return x.strip().lower() in ("true", "1", "yes")
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return True   # the Record default
    return bool(x)


def load_results(path: str | os.PathLike) -> pd.DataFrame:
    """results.parquet / results.csv (or a directory holding one) -> normalized DataFrame."""
    path = Path(path)
    if path.is_dir():
        for name in ("results.parquet", "results.csv"):
            if (path / name).exists():
                path = path / name
                break
        else:
            raise FileNotFoundError(f"no results.parquet or results.csv in {path}")
    df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    return normalize_results(df)


def write_results(df: pd.DataFrame, out: str | os.PathLike) -> tuple[Path, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pq, csv = out / "results.parquet", out / "results.csv"
    df.to_parquet(pq, index=False)
    df.to_csv(csv, index=False)
    return pq, csv


# --------------------------------------------------------------------------- cells

def cells(df: pd.DataFrame) -> pd.DataFrame:
    """One row per cell (all AXES but seed), seeds aggregated.

    Columns: the cell axes, n_seeds, n_ok, n_nonfinite, n_diverged, n_error, frac_nonfinite,
    frac_diverged, frac_error, frac_failed (nonfinite+diverged over runs that did not error;
    NaN when none ran), outcome (worst status across seeds: error < ok < diverged <
    nonfinite), n_outcome (seeds with that status), median_bad_step (median first_bad_step
    of those seeds), module and phase (most common among them), wall_time_s (sum), label.
    A frame that already is a cells table is returned as is.
    """
    if "n_seeds" in df.columns and "seed" not in df.columns:
        return df
    df = normalize_results(df)
    groups: dict[tuple, list[dict]] = {}
    cols = [*CELL_AXES, "status", "first_bad_step", "module", "phase", "wall_time_s"]
    for rec in df[cols].to_dict("records"):
        groups.setdefault(tuple(rec[a] for a in CELL_AXES), []).append(rec)
    rows = [{**dict(zip(CELL_AXES, key)), **_aggregate(runs)} for key, runs in groups.items()]
    out = pd.DataFrame(rows, columns=[*CELL_AXES, *_AGG_COLUMNS])
    out = sort_cells(out)
    out["median_bad_step"] = out["median_bad_step"].astype(float)
    return out


_AGG_COLUMNS = ("n_seeds", "n_ok", "n_nonfinite", "n_diverged", "n_error", "frac_nonfinite",
                "frac_diverged", "frac_error", "frac_failed", "outcome", "n_outcome",
                "median_bad_step", "module", "phase", "wall_time_s", "label")


def _isnull(x) -> bool:
    return x is None or x is pd.NA or (isinstance(x, float) and math.isnan(x))


def _aggregate(runs: list[dict]) -> dict:
    n = len(runs)
    statuses = [r["status"] if r["status"] in SEVERITY else "error" for r in runs]
    counts = {s: statuses.count(s) for s in STATUSES}
    ran = n - counts["error"]
    outcome = max(statuses, key=SEVERITY.__getitem__)
    bad = [r for r, s in zip(runs, statuses) if s == outcome]
    steps = [float(r["first_bad_step"]) for r in bad if not _isnull(r["first_bad_step"])]
    median_step = (statistics.median(steps) if outcome in ("nonfinite", "diverged") and steps
                   else math.nan)
    wall = sum(float(r["wall_time_s"]) for r in runs if not _isnull(r["wall_time_s"]))
    return {
        "n_seeds": n,
        "n_ok": counts["ok"],
        "n_nonfinite": counts["nonfinite"],
        "n_diverged": counts["diverged"],
        "n_error": counts["error"],
        "frac_nonfinite": counts["nonfinite"] / n,
        "frac_diverged": counts["diverged"] / n,
        "frac_error": counts["error"] / n,
        "frac_failed": (counts["nonfinite"] + counts["diverged"]) / ran if ran else math.nan,
        "outcome": outcome,
        "n_outcome": len(bad),
        "median_bad_step": median_step,
        "module": _mode(r["module"] for r in bad),
        "phase": _mode(r["phase"] for r in bad),
        "wall_time_s": wall,
        "label": _label(outcome, len(bad), n, median_step, counts["error"]),
    }


def _mode(values: Iterable):
    """Most common non-empty value (ties: alphabetically first), None if there is none."""
    vals = [str(v) for v in values if not _isnull(v) and str(v) != ""]
    if not vals:
        return None
    counts = Counter(vals)
    top = max(counts.values())
    return min(v for v, k in counts.items() if k == top)


def _label(outcome: str, k: int, n: int, step: float, n_error: int) -> str:
    """ "2/2 @37": 2 of 2 seeds had the cell's outcome, median first bad step 37.

    The outcome itself (non-finite / diverged) is the colour and the `outcome` column.
    """
    if outcome == "error":
        return "err"
    if outcome == "ok":
        return "" if n_error == 0 else f"{n_error}/{n} err"
    at = "" if math.isnan(step) else f" @{step:.0f}"
    return f"{k}/{n}{at}"


def _order_key(values: Iterable, order: Sequence[str]) -> dict:
    known = [v for v in order if v in set(values)]
    rest = sorted(v for v in set(values) if v not in order)
    return {v: i for i, v in enumerate([*known, *rest])}


def sort_cells(c: pd.DataFrame) -> pd.DataFrame:
    if c.empty:
        return c.reset_index(drop=True)
    p = _order_key(c["precision"], PRECISION_ORDER)
    s = _order_key(c["softmax"], SOFTMAX_ORDER)
    return (c.assign(_p=c["precision"].map(p), _s=c["softmax"].map(s))
             .sort_values([*[a for a in FACET_AXES], "_p", "_s", "lr"], kind="stable")
             .drop(columns=["_p", "_s"]).reset_index(drop=True))


# --------------------------------------------------------------------------- the map

def fmt_lr(lr: float) -> str:
    """Compact and uniform: 1e-4, 3e-4, 2.5e-5, 1e-2, 0.3."""
    if math.isnan(lr):
        return "nan"
    if lr == 0 or 0.1 <= abs(lr) < 1e3:
        return f"{lr:.3g}"
    mant, exp = f"{lr:.2e}".split("e")
    mant = mant.rstrip("0").rstrip(".")
    return f"{mant}e{int(exp)}"


def _fmt_value(axis: str, v) -> str:
    if axis == "lr":
        return fmt_lr(v)
    if isinstance(v, float):
        return f"{v:g}"
    return str(v) if str(v) != "" else "-"


def _facet_axes(c: pd.DataFrame) -> list[str]:
    return [a for a in FACET_AXES if a in c.columns and c[a].nunique(dropna=False) > 1]


def cell_color(outcome: str | None, frac_nonfinite: float = 1.0) -> tuple:
    from matplotlib.colors import to_rgb
    if outcome is None or outcome == "missing":
        return to_rgb(COLORS["missing"])
    if outcome == "nonfinite":
        lo, hi = to_rgb(COLORS["nonfinite_lo"]), to_rgb(COLORS["nonfinite_hi"])
        t = min(max(frac_nonfinite, 0.0), 1.0)
        return tuple(a + (b - a) * t for a, b in zip(lo, hi))
    return to_rgb(COLORS.get(outcome, COLORS["error"]))


def draw_map(cells_df: pd.DataFrame, path: str | os.PathLike, title: str | None = None):
    """Heatmap of cell outcomes -> `path` (PNG). Returns the matplotlib Figure.

    Rows: precision x softmax; columns: lr ascending; one panel per combination of the facet
    axes (warmup, clip, normalize, stress, guard, model, data) that take more than one value.
    Colour: ok green, diverged orange, non-finite red (darker = more seeds), error grey,
    missing white. Label: "k/n @s" = k of n seeds had the outcome, median first bad step s.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    c = cells_df.copy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if c.empty:
        fig = Figure(figsize=(4, 2))
        FigureCanvasAgg(fig)
        fig.text(0.5, 0.5, "no runs", ha="center", va="center")
        fig.savefig(path, dpi=100)
        return fig

    p_ord = _order_key(c["precision"], PRECISION_ORDER)
    s_ord = _order_key(c["softmax"], SOFTMAX_ORDER)
    row_keys = sorted({(p, s) for p, s in zip(c["precision"], c["softmax"])},
                      key=lambda k: (p_ord[k[0]], s_ord[k[1]]))
    lrs = sorted(c["lr"].unique())
    facet_axes = _facet_axes(c)
    facets = (sorted(c.groupby(facet_axes, dropna=False).groups) if facet_axes else [()])
    facets = [f if isinstance(f, tuple) else (f,) for f in facets]
    const_axes = [a for a in FACET_AXES if a not in facet_axes]

    n_f = len(facets)
    ncols = min(n_f, 4)
    nrows = math.ceil(n_f / ncols)
    cw, rh = 0.62, 0.27          # inches per heatmap column / row
    label_w = 1.25               # y tick labels
    panel_w = max(len(lrs) * cw, 1.6)
    panel_h = max(len(row_keys) * rh, 0.9)
    top_in, bottom_in, gap_h = 1.05, 0.85, 0.75
    fig_w = label_w + ncols * panel_w + (ncols - 1) * 0.25 + 0.3
    fig_h = top_in + bottom_in + nrows * panel_h + (nrows - 1) * gap_h
    fig = Figure(figsize=(max(fig_w, 6.0), fig_h), dpi=110)
    FigureCanvasAgg(fig)
    fig_w = max(fig_w, 6.0)

    fontsize = 6.5 if len(lrs) > 1 or panel_w < 2 else 7.5
    axes = []
    for i, facet in enumerate(facets):
        r, col = divmod(i, ncols)
        left = (label_w + col * (panel_w + 0.25)) / fig_w
        bottom = (bottom_in + (nrows - 1 - r) * (panel_h + gap_h)) / fig_h
        ax = fig.add_axes((left, bottom, panel_w / fig_w, panel_h / fig_h))
        axes.append(ax)
        sub = c
        for a, v in zip(facet_axes, facet):
            sub = sub[(sub[a] == v) | (sub[a].isna() & pd.isna(v))]
        lookup = {(row.precision, row.softmax, row.lr): row for row in sub.itertuples()}
        img = []
        for ri, (p, s) in enumerate(row_keys):
            line = []
            for ci, lr in enumerate(lrs):
                row = lookup.get((p, s, lr))
                if row is None:
                    line.append(cell_color(None))
                    continue
                rgb = cell_color(row.outcome, row.frac_nonfinite)
                line.append(rgb)
                lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
                if row.label:
                    ax.text(ci, ri, row.label, ha="center", va="center", fontsize=fontsize,
                            color="white" if lum < 0.5 else "black")
            img.append(line)
        ax.imshow(img, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(lrs)))
        ax.set_xticklabels([fmt_lr(x) for x in lrs], fontsize=7, rotation=0)
        ax.set_yticks(range(len(row_keys)))
        if col == 0:
            ax.set_yticklabels([f"{p} · {s}" for p, s in row_keys], fontsize=7)
        else:
            ax.set_yticklabels([])
        ax.set_xticks([x - 0.5 for x in range(1, len(lrs))], minor=True)
        ax.set_yticks([y - 0.5 for y in range(1, len(row_keys))], minor=True)
        ax.grid(which="minor", color="#dddddd", linewidth=0.6)
        ax.tick_params(which="minor", length=0)
        ax.tick_params(which="major", length=2, pad=2)
        # heavier lines between precision blocks
        for y in range(1, len(row_keys)):
            if row_keys[y][0] != row_keys[y - 1][0]:
                ax.axhline(y - 0.5, color="#555555", linewidth=1.0)
        for spine in ax.spines.values():
            spine.set_color("#555555")
        if r == nrows - 1 or i + ncols >= n_f:
            ax.set_xlabel("learning rate", fontsize=7.5)
        if facet_axes:
            # three facet values a line: with five swept axes one line overlaps the next panel
            parts = [f"{AXIS_SHORT.get(a, a)}={_fmt_value(a, v)}"
                     for a, v in zip(facet_axes, facet)]
            ax.set_title("\n".join("  ".join(parts[k:k + 3]) for k in range(0, len(parts), 3)),
                         fontsize=8, fontweight="bold", pad=4)

    const = "  ".join(f"{AXIS_SHORT.get(a, a)}={_fmt_value(a, c[a].iloc[0])}"
                      for a in const_axes if a in c.columns)
    n_runs = int(c["n_seeds"].sum())
    head = title or "Where fine-tuning turns to NaN"
    fig.text(0.5, 1 - 0.22 / fig_h, head, ha="center", va="top", fontsize=11,
             fontweight="bold")
    sub_t = (f"{len(c)} cell{'s' * (len(c) != 1)}, {n_runs} run{'s' * (n_runs != 1)} · label k/n @s: k of n seeds had the outcome, "
             f"median first bad step s" + (f"\nfixed: {const}" if const else ""))
    fig.text(0.5, 1 - 0.5 / fig_h, sub_t, ha="center", va="top", fontsize=7.5,
             color="#333333")
    handles = [
        Patch(facecolor=COLORS["ok"], edgecolor="#555555", label="ok (all seeds)"),
        Patch(facecolor=COLORS["diverged"], edgecolor="#555555", label="diverged (finite)"),
        Patch(facecolor=cell_color("nonfinite", 0.5), edgecolor="#555555",
              label="non-finite, some seeds"),
        Patch(facecolor=cell_color("nonfinite", 1.0), edgecolor="#555555",
              label="non-finite, all seeds"),
        Patch(facecolor=COLORS["error"], edgecolor="#555555", label="error (did not run)"),
        Patch(facecolor=COLORS["missing"], edgecolor="#555555", label="not run"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=6 if fig_w > 9 else 3, fontsize=7.5,
               frameon=False, bbox_to_anchor=(0.5, 0.05 / fig_h))
    fig.savefig(path, dpi=110)
    return fig


# --------------------------------------------------------------------------- verdicts

@dataclass(frozen=True)
class Contrast:
    advice: str
    axis: str
    name: str                                   # "naive -> stable"
    is_base: Callable[[object], bool]
    is_advice: Callable[[object], bool]
    next_lower: bool = False                    # lr: pair each lr with the next lower one


@dataclass
class Verdict:
    advice: str
    contrast: str
    n_pairs: int          # pairs of cells that differ in this axis only
    n_skipped: int        # pairs where a cell has no run that did not error
    both_ok: int          # both cells failure-free: no evidence
    helped: int           # advice cell has a lower failure fraction
    hurt: int             # advice cell has a higher failure fraction
    unchanged_bad: int    # equal failure fraction > 0
    verdict: str          # supports / refutes / cannot decide
    evidence: str
    pooled: bool = False

    @property
    def informative(self) -> int:
        return self.helped + self.hurt + self.unchanged_bad


VERDICT_RULE = (
    "Each pair is two cells equal in every axis but the one the advice changes (seeds "
    "aggregated within a cell). A cell's failure fraction is (non-finite + diverged) / runs "
    "that did not error; pairs where a cell has no such run are skipped. A pair *helped* if "
    "the advice cell's failure fraction is lower than the baseline's, *hurt* if higher, "
    "*equally bad* if equal and > 0; pairs where both cells are failure-free carry no "
    "evidence. Verdict: **supports** if helped >= 1 and helped >= 2 x hurt (at least two "
    "thirds of the pairs that changed got better); **refutes** if hurt >= 1 and hurt >= 2 x "
    "helped, or if some pair failed and the advice helped in none (it prevented no failure it "
    "was meant to prevent); **cannot decide** if no pair is informative (no pairs, or all "
    "both ok) or the changed pairs are mixed (neither side reaches two thirds). Contrasts with "
    "several target values (e.g. naive -> stable / safe / eager) are reported one by one and "
    "pooled (all their pairs together; a baseline cell can then appear in several pairs)."
)


def decide(helped: int, hurt: int, unchanged_bad: int) -> str:
    """The verdict rule (see VERDICT_RULE) from the pair counts."""
    if helped + hurt + unchanged_bad == 0:
        return "cannot decide"
    if helped >= 1 and helped >= 2 * hurt:
        return "supports"
    if (hurt >= 1 and hurt >= 2 * helped) or helped == 0:
        return "refutes"
    return "cannot decide"


def _eq(v):
    return lambda x: x == v


def _in(vs):
    return lambda x: x in vs


CONTRASTS: tuple[Contrast, ...] = (
    *(Contrast("use fp32", "precision", f"{p} -> fp32", _eq(p), _eq("fp32"))
      for p in ("bf16", "bf16_true", "fp16")),
    *(Contrast("use a max-subtracted softmax", "softmax", f"naive -> {s}", _eq("naive"), _eq(s))
      for s in ("stable", "safe", "eager", "sdpa")),
    Contrast("lower the lr", "lr", "lr -> next lower lr", lambda x: True, lambda x: True,
             next_lower=True),
    Contrast("add warmup", "warmup_steps", "0 -> >0", lambda x: x == 0, lambda x: x > 0),
    Contrast("clip gradients", "clip", "0 -> >0", lambda x: x == 0, lambda x: x > 0),
    Contrast("normalize inputs", "normalize", "False -> True", lambda x: not x, lambda x: x),
    Contrast("start in fp32, then switch to bf16", "precision", "bf16 -> progressive",
             _eq("bf16"), _eq("progressive")),
    *(Contrast("guard key nodes", "guard", f"none -> {g}", _eq("none"), _eq(g))
      for g in ("skip_step", "clamp")),
)


def failure_fraction(cells_df: pd.DataFrame, measure: str = "failed") -> pd.Series:
    """Per cell: (nonfinite [+ diverged]) / runs that did not error; NaN when none ran."""
    if measure not in ("failed", "nonfinite"):
        raise ValueError(f"measure must be 'failed' or 'nonfinite', not {measure!r}")
    ran = cells_df["n_seeds"] - cells_df["n_error"]
    bad = cells_df["n_nonfinite"] + (cells_df["n_diverged"] if measure == "failed" else 0)
    return (bad / ran.where(ran > 0)).astype(float)


def contrast_pairs(cells_df: pd.DataFrame, contrast: Contrast) -> list[tuple[int, int]]:
    """(baseline index, advice index) into cells_df for cells that differ in one axis only."""
    others = [a for a in CELL_AXES if a != contrast.axis]
    pairs = []
    if cells_df.empty:
        return pairs
    for _, g in cells_df.groupby(others, dropna=False, sort=False):
        if contrast.next_lower:
            g = g.sort_values(contrast.axis)
            idx = list(g.index)
            pairs += [(idx[i], idx[i - 1]) for i in range(1, len(idx))]
            continue
        base = [i for i, v in zip(g.index, g[contrast.axis]) if contrast.is_base(v)]
        adv = [i for i, v in zip(g.index, g[contrast.axis]) if contrast.is_advice(v)]
        pairs += [(b, a) for b in base for a in adv if b != a]
    return pairs


def judge(cells_df: pd.DataFrame, pairs: list[tuple[int, int]], advice: str, contrast: str,
          measure: str = "failed", pooled: bool = False) -> Verdict:
    skipped = both_ok = helped = hurt = same_bad = 0
    fb_sum = fa_sum = 0.0
    fail = failure_fraction(cells_df, measure)
    for b, a in pairs:
        fb, fa = fail[b], fail[a]
        if math.isnan(fb) or math.isnan(fa):
            skipped += 1
            continue
        fb_sum, fa_sum = fb_sum + fb, fa_sum + fa
        if fb == 0 and fa == 0:
            both_ok += 1
        elif fa < fb:
            helped += 1
        elif fa > fb:
            hurt += 1
        else:
            same_bad += 1
    informative = helped + hurt + same_bad
    verdict = decide(helped, hurt, same_bad)
    n = len(pairs)
    what = "failure" if measure == "failed" else "non-finite"
    if n == 0:
        evidence = "no pairs of cells differ in this axis only"
    else:
        compared = n - skipped
        evidence = (f"{n} pairs ({both_ok} both ok" + (f", {skipped} skipped: error" if skipped
                                                        else "") + f"); of {informative} "
                    f"informative: helped {helped}, hurt {hurt}, equally bad {same_bad}")
        if compared:
            evidence += (f"; mean {what} fraction {fb_sum / compared:.2f} -> "
                         f"{fa_sum / compared:.2f}")
    return Verdict(advice, contrast, n, skipped, both_ok, helped, hurt, same_bad, verdict,
                   evidence, pooled)


def verdicts(df: pd.DataFrame, measure: str = "failed") -> list[Verdict]:
    """One Verdict per contrast, plus a pooled one per advice with several contrasts.

    `df` is the results table (one row per run, e.g. read back from results.csv), or the
    cells() of it.
    `measure`: "failed" (non-finite or diverged, default) or "nonfinite".
    """
    c = cells(df)
    out: list[Verdict] = []
    by_advice: dict[str, list[tuple[Contrast, list]]] = {}
    for con in CONTRASTS:
        by_advice.setdefault(con.advice, []).append((con, contrast_pairs(c, con)))
    for advice, items in by_advice.items():
        for con, pairs in items:
            out.append(judge(c, pairs, advice, con.name, measure))
        if len(items) > 1:
            bases = list(dict.fromkeys(con.name.split(" -> ")[0] for con, _ in items))
            targets = list(dict.fromkeys(con.name.split(" -> ")[1] for con, _ in items))
            name = " -> ".join(v[0] if len(v) == 1 else "{" + ", ".join(v) + "}"
                               for v in (bases, targets))
            out.append(judge(c, [p for _, ps in items for p in ps], advice, f"pooled: {name}",
                             measure, pooled=True))
    return out


def verdicts_frame(vs: list[Verdict]) -> pd.DataFrame:
    return pd.DataFrame([{**{f.name: getattr(v, f.name) for f in fields(Verdict)},
                          "informative": v.informative} for v in vs])


# --------------------------------------------------------------------------- frontier

def frontier(df: pd.DataFrame) -> pd.DataFrame:
    """Stable-lr frontier per precision x softmax, for each combination of the other axes.

    max_ok_lr: largest lr at which every seed stayed ok (NaN if none).
    min_nonfinite_lr: smallest lr at which any seed went non-finite (NaN if none).
    min_failed_lr: smallest lr at which any seed went non-finite or diverged.
    monotone: False when max_ok_lr >= min_failed_lr, i.e. some seed failed at or below an lr
    where every seed was ok (seed noise, or a non-monotone effect).
    """
    c = cells(df)
    keys = [a for a in FACET_AXES] + ["precision", "softmax"]
    cols = [*keys, "lrs", "max_ok_lr", "min_nonfinite_lr", "min_failed_lr", "monotone"]
    rows = []
    if not c.empty:
        for key, g in c.groupby(keys, dropna=False, sort=False):
            ok = g[g["n_ok"] == g["n_seeds"]]["lr"]
            nf = g[g["n_nonfinite"] > 0]["lr"]
            failed = g[(g["n_nonfinite"] + g["n_diverged"]) > 0]["lr"]
            max_ok = float(ok.max()) if len(ok) else math.nan
            min_failed = float(failed.min()) if len(failed) else math.nan
            rows.append({**dict(zip(keys, key)), "lrs": len(g), "max_ok_lr": max_ok,
                         "min_nonfinite_lr": float(nf.min()) if len(nf) else math.nan,
                         "min_failed_lr": min_failed,
                         "monotone": not (max_ok >= min_failed)})
    out = pd.DataFrame(rows, columns=cols)
    if not out.empty:
        p = _order_key(out["precision"], PRECISION_ORDER)
        s = _order_key(out["softmax"], SOFTMAX_ORDER)
        out = (out.assign(_p=out["precision"].map(p), _s=out["softmax"].map(s))
                  .sort_values([*FACET_AXES, "_p", "_s"], kind="stable")
                  .drop(columns=["_p", "_s"]).reset_index(drop=True))
    return out


# --------------------------------------------------------------------------- report.md

def md_table(df: pd.DataFrame, floatfmt: str = "{:.3g}") -> str:
    """A small GitHub markdown table (no tabulate dependency)."""
    if df.empty:
        return "_(none)_\n"

    def fmt(v) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
            return ""
        if isinstance(v, float):
            return floatfmt.format(v)
        return str(v).replace("|", "\\|").replace("\n", " ")

    head = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---" for _ in head) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(fmt(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def _human_s(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


CELL_RULE = (
    "A *cell* is one combination of all axes but the seed. Fractions are over the cell's "
    "seeds. The cell's *outcome* is the worst status across its seeds in the order error < ok "
    "< diverged < nonfinite (so `error` only when no seed ran); its label `k/n @s` says k of n "
    "seeds had that outcome with median first bad step s."
)


FRONTIER_RULE = (
    "Per precision × softmax and each combination of the other axes: `max_ok_lr` is the "
    "largest lr at which every seed stayed ok (a seed that errored is not ok), "
    "`min_nonfinite_lr` the smallest lr at which any seed went non-finite, `min_failed_lr` the "
    "same for non-finite or diverged. `monotone` is False when a failure occurs at or below "
    "a clean lr."
)


def render_report(df: pd.DataFrame, c: pd.DataFrame, vs: list[Verdict], fr: pd.DataFrame,
                  map_name: str = "nan_map.png") -> str:
    varying = [a for a in CELL_AXES if c[a].nunique(dropna=False) > 1] if len(c) else []
    fixed = [a for a in CELL_AXES if a not in varying]
    run_counts = df["status"].value_counts()
    cell_counts = c["outcome"].value_counts() if len(c) else pd.Series(dtype=int)
    wall = float(df["wall_time_s"].fillna(0).sum()) if len(df) else 0.0
    dropped = df.attrs.get("duplicates_dropped", 0)
    L = ["# nanlab: NaN map report", ""]
    L.append(f"- runs: **{len(df)}**" + (f" ({dropped} duplicate records dropped, newest kept)"
                                         if dropped else ""))
    L.append(f"- cells: **{len(c)}** (seeds per cell: "
             f"{', '.join(str(x) for x in sorted(c['n_seeds'].unique())) if len(c) else '-'})")
    L.append("- runs by status: " + ", ".join(f"{s} {int(run_counts.get(s, 0))}"
                                              for s in STATUSES))
    L.append("- cells by outcome: " + ", ".join(f"{s} {int(cell_counts.get(s, 0))}"
                                               for s in ("ok", "diverged", "nonfinite",
                                                         "error")))
    if wall > 0:
        L.append(f"- wall time (sum over runs): {_human_s(wall)}")
    for col, name in (("device", "devices"), ("torch_version", "torch"),
                      ("transformers_version", "transformers")):
        vals = sorted({str(v) for v in df[col].dropna() if str(v)}) if len(df) else []
        if vals:
            L.append(f"- {name}: {', '.join(vals)}")
    if varying:
        L.append("- swept: " + "; ".join(
            f"{AXIS_SHORT.get(a, a)} ({', '.join(_fmt_value(a, v) for v in _sorted_vals(c, a))})"
            for a in varying))
    if fixed and len(c):
        L.append("- fixed: " + ", ".join(f"{AXIS_SHORT.get(a, a)}={_fmt_value(a, c[a].iloc[0])}"
                                         for a in fixed))
    L += ["", f"![NaN map]({map_name})", "", CELL_RULE, ""]

    L += ["## Verdicts", "", VERDICT_RULE, ""]
    vf = verdicts_frame(vs)
    if len(vf):
        show = vf[["advice", "contrast", "verdict", "n_pairs", "informative", "helped", "hurt",
                   "unchanged_bad", "both_ok", "evidence"]]
        L.append(md_table(show))
    L += ["## Stable-lr frontier", "",
          FRONTIER_RULE, ""]
    if len(fr):
        fcols = [a for a in FACET_AXES if fr[a].nunique(dropna=False) > 1]
        show = fr[[*fcols, "precision", "softmax", "lrs", "max_ok_lr", "min_nonfinite_lr",
                   "min_failed_lr", "monotone"]].copy()
        for col in ("max_ok_lr", "min_nonfinite_lr", "min_failed_lr"):
            show[col] = [("" if math.isnan(x) else fmt_lr(x)) for x in show[col]]
        L.append(md_table(show))
    else:
        L.append("_(none)_\n")

    errs = df[df["status"] == "error"]["error"].fillna("(no message)") if len(df) else []
    if len(errs):
        L += ["## Errors", ""]
        ec = errs.astype(str).str.slice(0, 160).value_counts().reset_index()
        ec.columns = ["error", "runs"]
        L.append(md_table(ec[["runs", "error"]]))

    L += ["## Cells", ""]
    if len(c):
        show = c[[*varying, "n_seeds", "outcome", "label", "frac_nonfinite", "frac_diverged",
                  "frac_error", "median_bad_step", "module", "phase"]].copy()
        if "lr" in show:
            show["lr"] = [fmt_lr(x) for x in show["lr"]]
        for col in ("frac_nonfinite", "frac_diverged", "frac_error"):
            show[col] = [f"{x:.2f}" for x in show[col]]
        show["median_bad_step"] = ["" if math.isnan(x) else f"{x:g}"
                                   for x in show["median_bad_step"]]
        L.append(md_table(show))
    return "\n".join(L)


def _sorted_vals(c: pd.DataFrame, axis: str) -> list:
    vals = list(c[axis].unique())
    if axis == "precision":
        o = _order_key(vals, PRECISION_ORDER)
        return sorted(vals, key=o.get)
    if axis == "softmax":
        o = _order_key(vals, SOFTMAX_ORDER)
        return sorted(vals, key=o.get)
    return sorted(vals)


def write_report(dirs: Sequence[str | os.PathLike] | str | os.PathLike,
                 out: str | os.PathLike | None = None, wandb: str = "off",
                 console=None) -> Path:
    """Collect -> results.{parquet,csv}, cells.csv, nan_map.png, verdicts.csv, frontier.csv,
    report.md in `out` (default: the first dir). Returns the path of report.md."""
    if isinstance(dirs, (str, os.PathLike)):
        dirs = [dirs]
    dirs = [Path(d) for d in dirs]
    out = Path(out) if out is not None else dirs[0]
    say = console.print if console is not None else (lambda *a, **k: None)
    df = collect(*dirs, progress=console is not None)
    if df.empty:
        raise FileNotFoundError(f"no record.json below {', '.join(map(str, dirs))}")
    out.mkdir(parents=True, exist_ok=True)
    write_results(df, out)
    say(f"[bold]{len(df)}[/] runs from {len(dirs)} dir(s)"
        + (f", [yellow]{df.attrs['duplicates_dropped']} duplicate(s) dropped[/] (newest kept)"
           if df.attrs["duplicates_dropped"] else ""))
    c = cells(df)
    c.to_csv(out / "cells.csv", index=False)
    png = out / "nan_map.png"
    draw_map(c, png)
    vs = verdicts(c)
    verdicts_frame(vs).to_csv(out / "verdicts.csv", index=False)
    fr = frontier(c)
    fr.to_csv(out / "frontier.csv", index=False)
    md = out / "report.md"
    md.write_text(render_report(df, c, vs, fr, map_name=png.name))
    if console is not None:
        _print_summary(console, c, vs)
    if wandb != "off":
        log_wandb(out, df, c, vs, png, mode=wandb)
        say(f"W&B ({wandb}) run written under {out / 'wandb'}")
    say(f"wrote {out / 'results.parquet'}, {png.name}, {md.name} in {out}")
    return md


def _print_summary(console, c: pd.DataFrame, vs: list[Verdict]) -> None:
    from rich.table import Table
    counts = c["outcome"].value_counts()
    console.print("cells: " + ", ".join(f"{s} {int(counts.get(s, 0))}"
                                        for s in ("ok", "diverged", "nonfinite", "error")))
    t = Table(title="Verdicts", show_lines=False)
    for col in ("advice", "contrast", "verdict", "evidence"):
        t.add_column(col, overflow="fold")
    style = {"supports": "green", "refutes": "red", "cannot decide": "dim"}
    for v in vs:
        t.add_row(v.advice, v.contrast, f"[{style[v.verdict]}]{v.verdict}[/]", v.evidence)
    console.print(t)


# --------------------------------------------------------------------------- W&B

def log_wandb(out: Path, df: pd.DataFrame, c: pd.DataFrame, vs: list[Verdict], png: Path,
              mode: str = "offline", project: str = "nanlab") -> None:
    """One W&B run with the results/cells/verdicts tables and the map, files under out/wandb."""
    import wandb  # lazy: heavy, and only needed here

    out.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=project, job_type="report", dir=str(out), mode=mode,
                     name=f"report-{out.name}", config={"dirs": df.attrs.get("dirs", [])},
                     settings=wandb.Settings(silent=True))
    try:
        res = df.drop(columns=["mtime"], errors="ignore").astype(object)
        res = res.where(res.notna(), None)
        cc = c.astype(object).where(c.notna(), None)
        run.log({
            "results": wandb.Table(dataframe=res.astype(str)),
            "cells": wandb.Table(dataframe=cc.astype(str)),
            "verdicts": wandb.Table(dataframe=verdicts_frame(vs).astype(str)),
            "nan_map": wandb.Image(str(png)),
        })
        counts = c["outcome"].value_counts()
        run.summary.update({"runs": len(df), "cells": len(c),
                            **{f"cells/{s}": int(counts.get(s, 0))
                               for s in ("ok", "diverged", "nonfinite", "error")}})
    finally:
        run.finish()


# --------------------------------------------------------------------------- CLI

def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m src.report",
                                 description="records -> results table, NaN map, verdicts")
    ap.add_argument("dirs", nargs="+", help="directories searched for record.json")
    ap.add_argument("--out", default=None, help="output directory (default: the first dir)")
    ap.add_argument("--wandb", choices=("off", "offline", "online"), default="off")
    args = ap.parse_args(argv)
    from rich.console import Console
    console = Console(stderr=False, highlight=False)
    try:
        md = write_report(args.dirs, args.out, wandb=args.wandb, console=console)
    except FileNotFoundError as e:
        console.print(f"[red]{e}[/]")
        return 2
    console.print(f"[bold green]report:[/] {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
