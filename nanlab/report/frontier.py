"""The stable-lr frontier of the core map (cells with stress=none).

Per precision x softmax (and any other setting that differs between core cells), against
lr_x (the lr as a multiple of the model's reference lr; lr where a record has none):

    max_ok     largest lr_x at which every seed is ok (finite and trained)
    min_failed smallest lr_x at which any seed went non-finite or diverged
    monotone   False when max_ok >= min_failed (a failure at or below a clean lr)
    test_fails the lr_x values whose cell was finite in training, non-finite at test time
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field

import pandas as pd

from .cells import TEST_FAILS, Cell
from .match import differing_keys, get

PRECISION_ORDER = ("fp32", "bf16", "bf16_true", "fp16", "progressive")
SOFTMAX_ORDER = ("sdpa", "eager", "naive", "stable", "safe", "zeroed", "softcap", "flash")
LR_KEYS = ("lr", "lr_x")

FRONTIER_RULE = (
    "Core cells (stress=none, run at two lr_x or more: a mechanism's control at its one lr_x "
    "is not a line), per precision × softmax: `max_ok` is the largest lr_x at "
    "which every seed was ok (finite and trained), `min_failed` the smallest at which any "
    "seed went non-finite or diverged; `monotone` is false when a failure comes at or below "
    "a clean lr_x. lr_x is the lr as a multiple of the model's reference lr (`lr` is used "
    "where a record has no lr_x). Both are training outcomes; the last column lists the lr_x "
    "whose cell was finite in training but non-finite at test time (its served test split)."
)


@dataclass
class Line:
    precision: str
    softmax: str
    context: str  # other settings of this line, when core cells differ
    axis: str  # lr_x or lr
    points: list[tuple[float, Cell]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.precision} · {self.softmax}" + (f" ({self.context})" if self.context else "")

    @property
    def max_ok(self) -> float | None:
        ok = [x for x, c in self.points if c.n_seeds and c.n_ok == c.n_seeds]
        return max(ok) if ok else None

    @property
    def min_failed(self) -> float | None:
        bad = [x for x, c in self.points if c.n_failed > 0]
        return min(bad) if bad else None

    @property
    def test_fails(self) -> list[float]:
        return [x for x, c in self.points if c.outcome == TEST_FAILS]

    @property
    def monotone(self) -> bool:
        a, b = self.max_ok, self.min_failed
        return a is None or b is None or a < b


def _order(value: str, order: tuple[str, ...]) -> tuple[int, str]:
    return (order.index(value) if value in order else len(order), value)


def _rest(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in (*LR_KEYS, "precision", "softmax")}


def lines(cells: list[Cell]) -> list[Line]:
    core = [c for c in cells if c.stress in ("none", "") and c.n_seeds]
    if not core:
        return []
    rests = Counter(json.dumps(_rest(c.config), sort_keys=True, default=str) for c in core)
    common = json.loads(rests.most_common(1)[0][0])
    groups: dict[str, list[Cell]] = {}
    for c in core:
        key = json.dumps(
            {k: v for k, v in c.config.items() if k not in LR_KEYS}, sort_keys=True, default=str
        )
        groups.setdefault(key + c.precision + c.softmax, []).append(c)
    out = []
    for g in groups.values():
        if len({c.lr_x if c.lr_x is not None else c.lr for c in g}) < 2:
            continue  # one lr (a mechanism's control, run at its baseline's lr) is no frontier
        c0 = g[0]
        axis = "lr_x" if all(c.lr_x is not None for c in g) else "lr"
        ctx = " ".join(f"{k}={get(c0.config, k)}" for k in differing_keys(common, _rest(c0.config)))
        line = Line(c0.precision, c0.softmax, ctx, axis)
        line.points = sorted(
            ((float(c.lr_x if axis == "lr_x" else c.lr), c) for c in g),  # type: ignore[arg-type]
            key=lambda xc: xc[0],
        )
        out.append(line)
    out.sort(
        key=lambda ln: (
            _order(ln.precision, PRECISION_ORDER),
            _order(ln.softmax, SOFTMAX_ORDER),
            ln.context,
        )
    )
    return out


def fmt_lr(x: float | None) -> str:
    """Compact: 1e-4, 2.5e-5, 0.3, 10."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    if x == 0 or 0.1 <= abs(x) < 1e3:
        return f"{x:.3g}"
    mant, exp = f"{x:.2e}".split("e")
    mant = mant.rstrip("0").rstrip(".")
    return f"{mant}e{int(exp)}"


def frontier_frame(ls: list[Line]) -> pd.DataFrame:
    rows = [
        {
            "precision": ln.precision,
            "softmax": ln.softmax,
            "context": ln.context,
            "axis": ln.axis,
            "values": " ".join(fmt_lr(x) for x, _ in ln.points),
            "max_ok": ln.max_ok,
            "min_failed": ln.min_failed,
            "monotone": ln.monotone,
            "seeds": " ".join(f"{c.n_ok}/{c.n_seeds}" for _, c in ln.points),
            "test_fails": " ".join(fmt_lr(x) for x in ln.test_fails),
        }
        for ln in ls
    ]
    return pd.DataFrame(
        rows,
        columns=[
            "precision",
            "softmax",
            "context",
            "axis",
            "values",
            "max_ok",
            "min_failed",
            "monotone",
            "seeds",
            "test_fails",
        ],
    )
