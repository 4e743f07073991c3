"""LR sensitivity per precision x mitigation (Wortsman et al. 2023, "Small-scale proxies for
large-scale Transformer training instabilities"): how far the final loss falls short of the
best one over an lr range spanning orders of magnitude.

A family: the runs (stress=none) whose resolved configs are equal except lr, lr_x and the
seed. Families are compared within a group: the same precision (and the same model, data,
max_steps and batch_size, where those vary). A family's mitigation label is its settings that
differ from the most common value over all families ("none" where it differs nowhere); the
override it names maps to an advice id (advice.MITIGATION_ADVICE).

    l(lr)       at each lr_x: the mean over seeds of the final loss, a run that went
                non-finite or diverged (or has no finite final loss) counted at its initial
                loss l0 (the family's median initial loss where a run has none); error and
                interrupted runs are no evidence
    l0(lr)      the mean initial loss of those seeds
    l*          the best (lowest) min(l(lr), l0(lr)) over every counted family of the group
    sensitivity mean over the family's lr_x values of min(l(lr), l0(lr)) - l*

Wortsman et al. take l* as the curve's own best over lr; that variant is `sensitivity_own`
(= sensitivity - (best - l*)). Only families with >= MIN_LRS lr_x values count.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from dataclasses import dataclass, field

import pandas as pd

from nanlab.record import FAILED

from .advice import MITIGATION_ADVICE, advice_for
from .cells import _isnull
from .collect import normalize_results, run_config
from .frontier import PRECISION_ORDER, _order, fmt_lr
from .match import flatten, get

MIN_LRS = 3
FINITE = ("ok", "stalled")
SKIP = ("lr", "lr_x", "seed")
CONTEXT = ("model", "data", "max_steps", "batch_size")  # what a group holds fixed
GROUPS = ("model", "data", "softmax", "guard", "monitor", "logger")  # Hydra config groups
UNSET = "<unset>"

SENSITIVITY_RULE = (
    "LR sensitivity (Wortsman et al. 2023, *Small-scale proxies for large-scale Transformer "
    "training instabilities*): E_lr[min(ℓ(lr), ℓ₀) − ℓ*] over an lr range spanning orders of "
    "magnitude. A **family** is the runs (stress=none) whose configs are equal except lr, "
    "lr_x and the seed; its **mitigation** is the settings where it differs from the most "
    "common value over the families (`none`: nowhere), named by its advice id where it has "
    "one. At each lr_x, **ℓ(lr)** is the mean over seeds of the final loss, a run that went "
    "non-finite or diverged counted at its initial loss **ℓ₀** (the family's median initial "
    "loss where the run has none); error and interrupted runs are no evidence. **ℓ\\*** is "
    "the best (lowest) min(ℓ(lr), ℓ₀) over **every family of the same precision** (Wortsman "
    "et al. take the curve's own best; that variant is `sensitivity_own` in "
    "lr_sensitivity.csv: sensitivity = sensitivity_own + (best − ℓ*)). **Sensitivity** = the "
    "mean over the family's lr_x values of min(ℓ(lr), ℓ₀) − ℓ*: 0 is the precision's best "
    "loss at every lr tried, ℓ₀ − ℓ* a family that never trained. Lower ranks first; only "
    f"families with at least {MIN_LRS} lr_x values count, and a family's mean is over its "
    "own grid. **Seeds' range**: the sensitivity of each seed alone, min–max; a family whose "
    "range overlaps the first-ranked one's is not told apart from it by these seeds."
)


@dataclass
class Point:
    """One lr_x of a family: its seeds that are evidence."""

    x: float
    finals: list[float] = field(default_factory=list)  # finite runs' final losses
    failed: list[float] = field(default_factory=list)  # failed runs' l0 (where counted)
    ell0s: list[float] = field(default_factory=list)  # every evidence run's l0
    n_ok: int = 0
    by_seed: dict[int, float] = field(default_factory=dict)  # min(the seed's loss, its l0)

    @property
    def n(self) -> int:
        return len(self.finals) + len(self.failed)

    @property
    def ell0(self) -> float:
        return statistics.fmean(self.ell0s)

    @property
    def raw(self) -> float:
        """l(lr): the mean over seeds, failed runs at their l0."""
        return statistics.fmean(self.finals + self.failed)

    @property
    def loss(self) -> float:
        """min(l(lr), l0)."""
        return min(self.raw, self.ell0)


@dataclass
class Family:
    precision: str
    context: str  # the group's other settings, where groups differ
    label: str  # "none", "optim.z_loss=0.0001", ...
    advice: str  # advice id(s) the label's overrides test ("" for none)
    axis: str  # lr_x or lr
    config: dict
    points: list[Point] = field(default_factory=list)
    n_no_evidence: int = 0  # error / interrupted runs
    ell_star: float | None = None
    rank: int | None = None

    @property
    def group(self) -> str:
        return self.precision + (f" · {self.context}" if self.context else "")

    @property
    def name(self) -> str:
        """The advice id and the overrides: 'z_loss (optim.z_loss=0.0001)'."""
        if self.advice and self.advice != self.label:
            return f"{self.advice} ({self.label})"
        return self.label

    @property
    def counts(self) -> bool:
        return len(self.points) >= MIN_LRS

    @property
    def xs(self) -> list[float]:
        return [p.x for p in self.points]

    @property
    def best(self) -> Point:
        return min(self.points, key=lambda p: (p.loss, p.x))

    @property
    def sensitivity(self) -> float | None:
        if self.ell_star is None or not self.counts:
            return None
        return statistics.fmean(p.loss - self.ell_star for p in self.points)

    @property
    def seed_range(self) -> tuple[float, float] | None:
        """The sensitivity of each seed alone (the seeds run at every lr_x), min and max:
        how far the seeds alone move the family's figure. None with fewer than 2 seeds."""
        if self.ell_star is None or not self.counts:
            return None
        seeds = set.intersection(*(set(p.by_seed) for p in self.points))
        if len(seeds) < 2:
            return None
        per_seed = [
            statistics.fmean(p.by_seed[s] - self.ell_star for p in self.points) for s in seeds
        ]
        return min(per_seed), max(per_seed)

    @property
    def sensitivity_own(self) -> float | None:
        """Wortsman et al.'s l*: the family's own best over lr."""
        if not self.counts:
            return None
        best = self.best.loss
        return statistics.fmean(p.loss - best for p in self.points)

    @property
    def max_all_ok(self) -> float | None:
        """The largest lr_x at which every seed was ok (finite and trained)."""
        ok = [p.x for p in self.points if p.n and p.n_ok == p.n]
        return max(ok) if ok else None

    @property
    def n_failed(self) -> int:
        return sum(len(p.failed) for p in self.points)

    @property
    def n_runs(self) -> int:
        return sum(p.n for p in self.points)

    @property
    def range_text(self) -> str:
        return f"{fmt_lr(min(self.xs))}–{fmt_lr(max(self.xs))} ({len(self.xs)})"


def _value(v) -> str:
    """A config value as an override writes it: true, 0.0001, [0.9,0.95], null."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def _is_context(key: str) -> bool:
    if any(key == k for k, _, _ in MITIGATION_ADVICE):
        return False
    return key.split(".")[0] in CONTEXT


def _settings(config: dict) -> dict[str, str]:
    """Flattened settings that can name a mitigation or a context (not precision, lr, seed,
    stress). A config group's option under the group ('softmax'); the name of a plain dict
    under its own key ('optim.name')."""
    kept = {k: v for k, v in config.items() if k not in (*SKIP, "precision", "stress")}
    out = {}
    for k, v in flatten(kept).items():
        if k in kept and isinstance(kept[k], dict) and k not in GROUPS:
            k = f"{k}.name"
        out[k] = _value(v)
    return out


def _mode(values: list[str]) -> str | None:
    """The most common value, where it is strictly the most common."""
    top = Counter(values).most_common(2)
    if len(top) == 2 and top[0][1] == top[1][1]:
        return None
    return top[0][0]


def _label(settings: dict[str, str], modes: dict[str, str | None]) -> list[str]:
    """Keys where the family differs from the most common value (every key with no most
    common value); a config group's keys go with its option when the option differs."""
    keys = [k for k in modes if modes[k] is None or settings.get(k, UNSET) != modes[k]]
    groups = {k for k in keys if k in GROUPS}
    return [k for k in keys if not any(k.startswith(g + ".") for g in groups)]


def families(df: pd.DataFrame) -> list[Family]:
    """The results table -> LR families (counted or not), ranked within their group."""
    df = normalize_results(df)
    runs: dict[str, list[tuple[dict, dict]]] = {}
    for row in df.to_dict("records"):
        config = run_config(row)
        if (get(config, "stress") or row["stress"] or "none") != "none":
            continue
        if not config:  # a record without its config: the swept axes stand in
            config = {
                a: row[a]
                for a in (
                    "precision",
                    "softmax",
                    "warmup_steps",
                    "clip",
                    "normalize",
                    "guard",
                    "model",
                    "data",
                )
            }
        key = json.dumps(
            {k: v for k, v in config.items() if k not in SKIP}, sort_keys=True, default=str
        )
        runs.setdefault(key, []).append((row, config))
    if not runs:
        return []
    settings = {k: _settings(v[0][1]) for k, v in runs.items()}
    keys = sorted({s for d in settings.values() for s in d})
    modes = {k: _mode([d.get(k, UNSET) for d in settings.values()]) for k in keys}
    out = []
    for key, rs in runs.items():
        s = settings[key]
        differ = _label(s, modes)
        context = " ".join(f"{k}={s[k]}" for k in differ if _is_context(k))
        over = [f"{k}={s.get(k, UNSET)}" for k in differ if not _is_context(k)]
        ids = list(dict.fromkeys(a for o in over if (a := advice_for(*o.split("=", 1)))))
        fam = Family(
            precision=str(get(rs[0][1], "precision") or rs[0][0]["precision"]),
            context=context,
            label=" ".join(over) or "none",
            advice="+".join(ids),
            axis="lr_x" if all(not _isnull(r["lr_x"]) for r, _ in rs) else "lr",
            config=json.loads(key),
        )
        _fill(fam, [r for r, _ in rs])
        out.append(fam)
    _rank(out)
    return sorted(
        out,
        key=lambda f: (
            _order(f.precision, PRECISION_ORDER),
            f.context,
            f.rank is None,
            f.rank or 0,
            f.label,
        ),
    )


def _finite(x) -> bool:
    return not _isnull(x) and math.isfinite(float(x))


def _fill(fam: Family, rows: list[dict]) -> None:
    inits = [float(r["initial_loss"]) for r in rows if _finite(r["initial_loss"])]
    fallback = statistics.median(inits) if inits else math.nan
    points: dict[float, Point] = {}
    for r in rows:
        if r["status"] not in (*FINITE, *FAILED):
            fam.n_no_evidence += 1
            continue
        x = float(r[fam.axis])
        x = float(f"{x:.12g}")  # one point per lr, float noise aside
        p = points.setdefault(x, Point(x))
        ell0 = float(r["initial_loss"]) if _finite(r["initial_loss"]) else fallback
        p.ell0s.append(ell0)
        if r["status"] in FINITE and _finite(r["final_loss"]):
            p.finals.append(float(r["final_loss"]))
            p.n_ok += int(r["status"] == "ok")
            loss = float(r["final_loss"])
        else:
            p.failed.append(ell0)
            loss = ell0
        if not _isnull(r.get("seed")):
            p.by_seed[int(r["seed"])] = min(loss, ell0)
    fam.points = sorted((p for p in points.values() if not math.isnan(p.loss)), key=lambda p: p.x)


def _rank(fams: list[Family]) -> None:
    """l* per group over the counted families; rank 1 = the lowest sensitivity (ties share
    the rank)."""
    groups: dict[tuple[str, str], list[Family]] = {}
    for f in fams:
        if f.counts:
            groups.setdefault((f.precision, f.context), []).append(f)
    for g in groups.values():
        star = min(f.best.loss for f in g)
        for f in g:
            f.ell_star = star
        # counted families (f.counts) have a sensitivity
        vals = sorted(round(f.sensitivity, 12) for f in g)  # type: ignore[arg-type]
        for f in g:
            f.rank = 1 + vals.index(round(f.sensitivity, 12))  # type: ignore[arg-type]


def tied_with_first(fs: list[Family]) -> list[Family]:
    """The families of a group (in rank order) whose seeds' range overlaps the first's:
    these seeds do not tell them apart from rank 1."""
    first = fs[0].seed_range
    if first is None:
        return []
    return [
        f
        for f in fs[1:]
        if f.seed_range is not None and f.seed_range[0] <= first[1] and first[0] <= f.seed_range[1]
    ]


def counted(fams: list[Family]) -> list[Family]:
    return [f for f in fams if f.counts]


def by_group(fams: list[Family]) -> dict[str, list[Family]]:
    """Counted families per group, in rank order."""
    out: dict[str, list[Family]] = {}
    for f in counted(fams):
        out.setdefault(f.group, []).append(f)
    return {g: sorted(v, key=lambda f: (f.rank, f.label)) for g, v in out.items()}


def ranking_lines(fams: list[Family], top: int | None = None) -> list[str]:
    """Per group: 'bf16: 1. z_loss (optim.z_loss=0.0001) 0.875, 2. ...'."""
    lines = []
    for g, fs in by_group(fams).items():
        shown = fs[:top] if top else fs
        more = len(fs) - len(shown)
        lines.append(
            f"{g} (ℓ* {fs[0].ell_star:.4g}): "
            + ", ".join(f"{f.rank}. {f.name} {f.sensitivity:.3g}" for f in shown)
            + (f", +{more} more" if more > 0 else "")
        )
    return lines


def untested_advice(fams: list[Family]) -> list[str]:
    """The mitigation advice ids (MITIGATION_ADVICE) no counted family tests."""
    seen = {a for f in counted(fams) for a in f.advice.split("+") if a}
    return [a for a in dict.fromkeys(a for _, _, a in MITIGATION_ADVICE) if a not in seen]


COLUMNS = [
    "precision",
    "context",
    "mitigation",
    "advice",
    "axis",
    "lr_min",
    "lr_max",
    "n_lr",
    "lr_values",
    "runs",
    "failed_runs",
    "no_evidence_runs",
    "sensitivity",
    "sensitivity_own",
    "best_loss",
    "best_lr",
    "ell_star",
    "ell0",
    "max_all_ok",
    "rank",
    "counts",
    "seed_sensitivity_min",
    "seed_sensitivity_max",
    "losses",
]


def sensitivity_frame(fams: list[Family]) -> pd.DataFrame:
    """One row per family (lr_sensitivity.csv); `losses`: min(l(lr), l0) per lr as JSON."""
    rows = []
    for f in fams:
        b = f.best if f.points else None
        rows.append(
            {
                "precision": f.precision,
                "context": f.context,
                "mitigation": f.label,
                "advice": f.advice,
                "axis": f.axis,
                "lr_min": min(f.xs, default=None),
                "lr_max": max(f.xs, default=None),
                "n_lr": len(f.points),
                "lr_values": " ".join(fmt_lr(x) for x in f.xs),
                "runs": f.n_runs,
                "failed_runs": f.n_failed,
                "no_evidence_runs": f.n_no_evidence,
                "sensitivity": f.sensitivity,
                "sensitivity_own": f.sensitivity_own,
                "best_loss": b.loss if b else None,
                "best_lr": b.x if b else None,
                "ell_star": f.ell_star,
                "ell0": statistics.median([e for p in f.points for e in p.ell0s])
                if f.points
                else None,
                "max_all_ok": f.max_all_ok,
                "rank": f.rank,
                "counts": f.counts,
                "seed_sensitivity_min": f.seed_range[0] if f.seed_range else None,
                "seed_sensitivity_max": f.seed_range[1] if f.seed_range else None,
                "losses": json.dumps({fmt_lr(p.x): round(p.loss, 6) for p in f.points}),
            }
        )
    return pd.DataFrame(rows, columns=COLUMNS)
