"""Runs -> cells: seeds pooled by the record's `cell` (the config hash without the seed).

Two runs are seeds of one cell only when their resolved configs agree in everything but the
seed; the swept axes alone never decide it. Interrupted and error runs are shown but are no
evidence: a cell's n_seeds counts the runs that finished (ok, stalled, nonfinite, diverged).
"""
from __future__ import annotations

import hashlib
import json
import math
import statistics
from collections import Counter
from dataclasses import dataclass, field

import pandas as pd

from src.record import FAILED

from .collect import normalize_results, run_config
from .match import NEVER_COMPARED, get

EVIDENCE = ("ok", "stalled", "nonfinite", "diverged")
MIN_SEEDS = 3


def two_thirds(k: int, n: int) -> bool:
    """k of n is at least two thirds (exact, in integers)."""
    return n > 0 and 3 * k >= 2 * n


def median(values) -> float | None:
    vals = [float(v) for v in values if not _isnull(v)]
    return statistics.median(vals) if vals else None


def _isnull(x) -> bool:
    return x is None or x is pd.NA or (isinstance(x, float) and math.isnan(x))


@dataclass
class Cell:
    """One cell: its config (without the seed) and the outcome of its seeds."""
    key: str
    config: dict
    precision: str = ""
    softmax: str = ""
    stress: str = "none"
    lr: float = math.nan
    lr_x: float | None = None
    seeds: list[int] = field(default_factory=list)
    n_ok: int = 0
    n_stalled: int = 0
    n_nonfinite: int = 0
    n_diverged: int = 0
    n_error: int = 0
    n_interrupted: int = 0
    causes: dict[str, int] = field(default_factory=dict)   # failing seeds' causes
    median_bad_step: float | None = None      # failing seeds
    median_param_frac: float | None = None    # failing seeds: nonfinite_param_frac
    module: str | None = None
    phase: str | None = None
    wall_time_s: float = 0.0

    @property
    def n_seeds(self) -> int:
        """Seeds that are evidence: finished ok, stalled, non-finite or diverged."""
        return self.n_ok + self.n_stalled + self.n_nonfinite + self.n_diverged

    @property
    def n_failed(self) -> int:
        return self.n_nonfinite + self.n_diverged

    @property
    def n_finite(self) -> int:
        return self.n_ok + self.n_stalled

    def n_failed_with(self, cause: str | None) -> int:
        if not cause:
            return self.n_failed
        return sum(self.causes.get(c, 0) for c in str(cause).split(" or "))

    @property
    def enough_seeds(self) -> bool:
        return self.n_seeds >= MIN_SEEDS

    @property
    def state(self) -> str:
        """ok / fails / stalls / mixed / none (no evidence), by the 2/3 rule.

        ok: >= 2/3 of seeds ok (finite and trained); fails: >= 2/3 non-finite or diverged;
        stalls: >= 2/3 stalled (finite, not trained); mixed: anything else.
        """
        n = self.n_seeds
        if n == 0:
            return "none"
        if two_thirds(self.n_ok, n):
            return "ok"
        if two_thirds(self.n_failed, n):
            return "fails"
        if two_thirds(self.n_stalled, n):
            return "stalls"
        return "mixed"

    def counts(self) -> str:
        """'3/3 ok' or '0 ok, 1 stalled, 2 non-finite of 3' (+ not evidence)."""
        n = self.n_seeds
        parts = [f"{k} {name}" for k, name in ((self.n_ok, "ok"), (self.n_stalled, "stalled"),
                                                (self.n_nonfinite, "non-finite"),
                                                (self.n_diverged, "diverged")) if k]
        if len(parts) == 1:
            k, name = parts[0].split(" ", 1)
            text = f"{k}/{n} {name}"
        else:
            text = ", ".join(parts) + f" of {n}" if parts else "no finished seed"
        extra = [f"{k} {name}" for k, name in ((self.n_error, "error"),
                                                (self.n_interrupted, "interrupted")) if k]
        return text + (f" (+{', '.join(extra)}: not evidence)" if extra else "")

    def causes_text(self) -> str:
        return ", ".join(f"{c} {k}" for c, k in sorted(self.causes.items(),
                                                        key=lambda kv: (-kv[1], kv[0])))

    def describe(self, vs: dict | None = None) -> str:
        """The settings of this cell that differ from `vs` (another cell's config)."""
        from .match import differing_keys
        keys = differing_keys(vs or {}, self.config) if vs is not None else []
        return " ".join(f"{k}={_short(get(self.config, k))}" for k in keys)


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)[:40]
    return str(v)


def fallback_key(row: dict, config: dict) -> str:
    """A cell key for records written before `cell` existed: the config without the seed,
    or the swept axes when there is no config either."""
    if config:
        kept = {k: v for k, v in config.items() if k not in NEVER_COMPARED}
        return "cfg:" + hashlib.sha1(json.dumps(kept, sort_keys=True, default=str)
                                     .encode()).hexdigest()[:12]
    axes = ("precision", "softmax", "lr", "warmup_steps", "clip", "normalize", "stress",
            "guard", "model", "data")
    return "axes:" + "|".join(str(row.get(a)) for a in axes)


def build_cells(df: pd.DataFrame) -> list[Cell]:
    """The results table -> cells, grouped by the `cell` column."""
    df = normalize_results(df)
    groups: dict[str, list[tuple[dict, dict]]] = {}
    for row in df.to_dict("records"):
        config = run_config(row)
        key = row["cell"] or fallback_key(row, config)
        groups.setdefault(key, []).append((row, config))
    return [_cell(key, runs) for key, runs in groups.items()]


def _cell(key: str, runs: list[tuple[dict, dict]]) -> Cell:
    first, config = runs[0]
    statuses = Counter(r["status"] for r, _ in runs)
    failing = [r for r, _ in runs if r["status"] in FAILED]
    lr_x = first.get("lr_x")
    c = Cell(
        key=key, config={k: v for k, v in config.items() if k not in NEVER_COMPARED},
        precision=first["precision"], softmax=first["softmax"],
        stress=(get(config, "stress") or first["stress"] or "none"),
        lr=float(first["lr"]), lr_x=None if _isnull(lr_x) else float(lr_x),
        seeds=sorted(int(r["seed"]) for r, _ in runs),
        n_ok=statuses["ok"], n_stalled=statuses["stalled"], n_nonfinite=statuses["nonfinite"],
        n_diverged=statuses["diverged"], n_interrupted=statuses["interrupted"],
        n_error=sum(k for s, k in statuses.items() if s not in (*EVIDENCE, "interrupted")),
        causes=dict(Counter(str(r["cause"] or "none") for r in failing)),
        median_bad_step=median(r["first_bad_step"] for r in failing),
        median_param_frac=median(r["nonfinite_param_frac"] for r in failing),
        module=_mode(r["module"] for r in failing), phase=_mode(r["phase"] for r in failing),
        wall_time_s=sum(float(r["wall_time_s"]) for r, _ in runs
                        if not _isnull(r["wall_time_s"])),
    )
    return c


def _mode(values):
    vals = [str(v) for v in values if not _isnull(v) and str(v) != ""]
    if not vals:
        return None
    counts = Counter(vals)
    top = max(counts.values())
    return min(v for v, k in counts.items() if k == top)


def lr_axis(cells: list[Cell]) -> str:
    """'lr_x' when every cell has one (the lr on the model's reference scale), else 'lr'."""
    return "lr_x" if cells and all(c.lr_x is not None for c in cells) else "lr"


def cells_frame(cells: list[Cell]) -> pd.DataFrame:
    """One row per cell (for cells.csv and the notebook)."""
    rows = []
    for c in cells:
        rows.append({
            "cell": c.key, "stress": c.stress, "precision": c.precision, "softmax": c.softmax,
            "lr": c.lr, "lr_x": c.lr_x, "n_seeds": c.n_seeds, "n_ok": c.n_ok,
            "n_stalled": c.n_stalled, "n_nonfinite": c.n_nonfinite,
            "n_diverged": c.n_diverged, "n_error": c.n_error,
            "n_interrupted": c.n_interrupted, "state": c.state, "counts": c.counts(),
            "causes": c.causes_text(), "median_bad_step": c.median_bad_step,
            "median_param_frac": c.median_param_frac, "module": c.module, "phase": c.phase,
            "wall_time_s": c.wall_time_s, "seeds": " ".join(map(str, c.seeds)),
            "config": json.dumps(c.config, sort_keys=True, default=str),
        })
    cols = ["cell", "stress", "precision", "softmax", "lr", "lr_x", "n_seeds", "n_ok",
            "n_stalled", "n_nonfinite", "n_diverged", "n_error", "n_interrupted", "state",
            "counts", "causes", "median_bad_step", "median_param_frac", "module", "phase",
            "wall_time_s", "seeds", "config"]
    return pd.DataFrame(rows, columns=cols)
