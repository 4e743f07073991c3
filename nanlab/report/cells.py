"""Runs -> cells: seeds pooled by the record's `cell` (the config hash without the seed).

Two runs are seeds of one cell only when their resolved configs agree in everything but the
seed; the swept axes alone never decide it. Interrupted and error runs are shown but are no
evidence: a cell's n_seeds counts the runs that finished (ok, stalled, nonfinite, diverged).

Beside the training outcome, the test-time one: a run that stayed finite serves its test split
(nanlab/run/serve.py: batched, left-padded) and records test_status finite / nonfinite, the failing
sample ids and the cause. A cell that trained finite but whose test pass was non-finite (>= 2/3
of the seeds that ran it) has its own outcome, TEST_FAILS: "finite in training, non-finite at
test time".
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field

import pandas as pd

from nanlab.record import FAILED

from .collect import json_list, normalize_results, run_config
from .match import NEVER_COMPARED, get

EVIDENCE = ("ok", "stalled", "nonfinite", "diverged")
MIN_SEEDS = 3
TEST_FAILS = "test_fails"
OUTCOMES = ("ok", "stalls", TEST_FAILS, "fails", "mixed", "none")
OUTCOME_TEXT = {
    "ok": "ok",
    "stalls": "stalls",
    TEST_FAILS: "finite in training, non-finite at test time",
    "fails": "fails",
    "mixed": "mixed",
    "none": "none",
}


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
    causes: dict[str, int] = field(default_factory=dict)  # failing seeds' causes
    median_bad_step: float | None = None  # failing seeds
    median_param_frac: float | None = None  # failing seeds: nonfinite_param_frac
    module: str | None = None
    phase: str | None = None
    wall_time_s: float = 0.0
    # the test-time pass (seeds that are evidence; it runs only where training stayed finite)
    n_test_finite: int = 0
    n_test_nonfinite: int = 0
    test_causes: dict[str, int] = field(default_factory=dict)  # non-finite test passes
    test_failing: dict[str, int] = field(default_factory=dict)  # sample id -> seeds failing it
    test_pads: dict[str, int] = field(default_factory=dict)  # sample id -> its left padding
    test_samples: int = 0  # test samples served (largest over seeds)
    median_test_nonfinite: float | None = None  # seeds that ran the test pass
    test_module: str | None = None
    test_precision: str | None = None
    test_padding_side: str | None = None

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
    def n_test_run(self) -> int:
        return self.n_test_finite + self.n_test_nonfinite

    @property
    def n_test_not_run(self) -> int:
        return self.n_seeds - self.n_test_run

    def n_test_failed_with(self, cause: str | None) -> int:
        """Seeds whose test pass was non-finite with `cause` ("a or b": either)."""
        if not cause:
            return self.n_test_nonfinite
        return sum(self.test_causes.get(c, 0) for c in str(cause).split(" or "))

    @property
    def trained_finite(self) -> bool:
        """>= 2/3 of the seeds stayed finite in training (ok or stalled)."""
        return two_thirds(self.n_finite, self.n_seeds)

    @property
    def test_fails(self) -> bool:
        """>= 2/3 of the seeds that ran the test pass were non-finite there."""
        return two_thirds(self.n_test_nonfinite, self.n_test_run)

    @property
    def outcome(self) -> str:
        """The training state, or TEST_FAILS where training stayed finite (ok or stalled,
        >= 2/3 of seeds) and the test pass was non-finite (>= 2/3 of the seeds that ran it)."""
        if self.trained_finite and self.test_fails:
            return TEST_FAILS
        return self.state

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
        parts = [
            f"{k} {name}"
            for k, name in (
                (self.n_ok, "ok"),
                (self.n_stalled, "stalled"),
                (self.n_nonfinite, "non-finite"),
                (self.n_diverged, "diverged"),
            )
            if k
        ]
        if len(parts) == 1:
            k, name = parts[0].split(" ", 1)
            text = f"{k}/{n} {name}"
        else:
            text = ", ".join(parts) + f" of {n}" if parts else "no finished seed"
        extra = [
            f"{k} {name}"
            for k, name in ((self.n_error, "error"), (self.n_interrupted, "interrupted"))
            if k
        ]
        return text + (f" (+{', '.join(extra)}: not evidence)" if extra else "")

    def causes_text(self) -> str:
        return _by_count(self.causes)

    def test_counts(self) -> str:
        """'3/3 non-finite at test time' or '1 finite, 1 non-finite at test time of 2 served (1
        not run)'; 'not run' where no seed served its test split."""
        if not self.n_test_run:
            return "test not run"
        both = [
            (k, name)
            for k, name in ((self.n_test_finite, "finite"), (self.n_test_nonfinite, "non-finite"))
            if k
        ]
        if len(both) == 1 and not self.n_test_not_run:
            return f"{both[0][0]}/{self.n_seeds} {both[0][1]} at test time"
        parts = [f"{k} {name}" for k, name in both]
        return (
            ", ".join(parts)
            + f" at test time of {self.n_test_run} served"
            + (f" ({self.n_test_not_run} not run)" if self.n_test_not_run else "")
        )

    def test_causes_text(self) -> str:
        return _by_count(self.test_causes)

    def test_ids_text(self, limit: int = 8) -> str:
        """The failing test samples over the seeds: 'shapes/test/3 (pad 5) x3, ...'."""
        items = sorted(self.test_failing.items(), key=lambda kv: (-kv[1], _natural(kv[0])))
        out = [
            f"{i}" + (f" (pad {self.test_pads[i]})" if i in self.test_pads else "") + f" ×{k}"
            for i, k in items[:limit]
        ]
        more = len(items) - limit
        return ", ".join(out) + (f", +{more} more" if more > 0 else "")

    def test_samples_text(self) -> str:
        """Median non-finite test samples of the seeds that ran it / samples served."""
        if not self.n_test_run:
            return ""
        k = self.median_test_nonfinite
        return f"{'-' if k is None else f'{k:g}'}/{self.test_samples}"

    def describe(self, vs: dict | None = None) -> str:
        """The settings of this cell that differ from `vs` (another cell's config)."""
        from .match import differing_keys

        keys = differing_keys(vs or {}, self.config) if vs is not None else []
        return " ".join(f"{k}={_short(get(self.config, k))}" for k in keys)


def _by_count(d: dict[str, int]) -> str:
    return ", ".join(f"{c} {k}" for c, k in sorted(d.items(), key=lambda kv: (-kv[1], kv[0])))


def _natural(s: str) -> tuple:
    """'shapes/test/10' after 'shapes/test/9'."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(s)))


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
        return (
            "cfg:"
            + hashlib.sha1(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:12]
        )
    axes = (
        "precision",
        "softmax",
        "lr",
        "warmup_steps",
        "clip",
        "normalize",
        "stress",
        "guard",
        "model",
        "data",
    )
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
        key=key,
        config={k: v for k, v in config.items() if k not in NEVER_COMPARED},
        precision=first["precision"],
        softmax=first["softmax"],
        stress=(get(config, "stress") or first["stress"] or "none"),
        lr=float(first["lr"]),
        lr_x=None if _isnull(lr_x) else float(lr_x),  # type: ignore[arg-type]
        seeds=sorted(int(r["seed"]) for r, _ in runs),
        n_ok=statuses["ok"],
        n_stalled=statuses["stalled"],
        n_nonfinite=statuses["nonfinite"],
        n_diverged=statuses["diverged"],
        n_interrupted=statuses["interrupted"],
        n_error=sum(k for s, k in statuses.items() if s not in (*EVIDENCE, "interrupted")),
        causes=dict(Counter(str(r["cause"] or "none") for r in failing)),
        median_bad_step=median(r["first_bad_step"] for r in failing),
        median_param_frac=median(r["nonfinite_param_frac"] for r in failing),
        module=_mode(r["module"] for r in failing),
        phase=_mode(r["phase"] for r in failing),
        wall_time_s=sum(float(r["wall_time_s"]) for r, _ in runs if not _isnull(r["wall_time_s"])),
    )
    served = [
        r
        for r, _ in runs
        if r["status"] in EVIDENCE and r.get("test_status") in ("finite", "nonfinite")
    ]
    bad = [r for r in served if r["test_status"] == "nonfinite"]
    c.n_test_finite, c.n_test_nonfinite = len(served) - len(bad), len(bad)
    c.test_causes = dict(Counter(str(r.get("test_cause") or "unknown") for r in bad))
    failing_ids: Counter = Counter()
    for r in bad:
        ids = [str(i) for i in json_list(r.get("test_failing_ids"))]
        pads = json_list(r.get("test_failing_pads"))
        failing_ids.update(dict.fromkeys(ids, 1))
        for i, k in zip(ids, pads):
            c.test_pads.setdefault(i, int(k))
    c.test_failing = dict(failing_ids)
    c.test_samples = max((int(r.get("test_samples") or 0) for r in served), default=0)
    c.median_test_nonfinite = median(r.get("test_nonfinite") for r in served)
    c.test_module = _mode(r.get("test_module") for r in bad)
    c.test_precision = _mode(r.get("test_precision") for r in served)
    c.test_padding_side = _mode(r.get("test_padding_side") for r in served)
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
        rows.append(
            {
                "cell": c.key,
                "stress": c.stress,
                "precision": c.precision,
                "softmax": c.softmax,
                "lr": c.lr,
                "lr_x": c.lr_x,
                "n_seeds": c.n_seeds,
                "n_ok": c.n_ok,
                "n_stalled": c.n_stalled,
                "n_nonfinite": c.n_nonfinite,
                "n_diverged": c.n_diverged,
                "n_error": c.n_error,
                "n_interrupted": c.n_interrupted,
                "state": c.state,
                "outcome": c.outcome,
                "counts": c.counts(),
                "causes": c.causes_text(),
                "median_bad_step": c.median_bad_step,
                "median_param_frac": c.median_param_frac,
                "module": c.module,
                "phase": c.phase,
                "wall_time_s": c.wall_time_s,
                "seeds": " ".join(map(str, c.seeds)),
                "n_test_finite": c.n_test_finite,
                "n_test_nonfinite": c.n_test_nonfinite,
                "n_test_not_run": c.n_test_not_run,
                "test_counts": c.test_counts(),
                "test_samples": c.test_samples,
                "median_test_nonfinite": c.median_test_nonfinite,
                "test_failing": json.dumps(c.test_failing, sort_keys=True),
                "test_pads": json.dumps(c.test_pads, sort_keys=True),
                "test_causes": c.test_causes_text(),
                "test_module": c.test_module,
                "test_precision": c.test_precision,
                "test_padding_side": c.test_padding_side,
                "config": json.dumps(c.config, sort_keys=True, default=str),
            }
        )
    cols = [
        "cell",
        "stress",
        "precision",
        "softmax",
        "lr",
        "lr_x",
        "n_seeds",
        "n_ok",
        "n_stalled",
        "n_nonfinite",
        "n_diverged",
        "n_error",
        "n_interrupted",
        "state",
        "outcome",
        "counts",
        "causes",
        "median_bad_step",
        "median_param_frac",
        "module",
        "phase",
        "wall_time_s",
        "seeds",
        "n_test_finite",
        "n_test_nonfinite",
        "n_test_not_run",
        "test_counts",
        "test_samples",
        "median_test_nonfinite",
        "test_failing",
        "test_pads",
        "test_causes",
        "test_module",
        "test_precision",
        "test_padding_side",
        "config",
    ]
    return pd.DataFrame(rows, columns=cols)
