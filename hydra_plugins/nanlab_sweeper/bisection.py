"""The stable-lr frontier by bisection, the search itself: the largest stable value of one
setting per combination, on a log scale. Plain Python (no Hydra), tested with fake oracles in
tests/test_bisection.py; the Hydra sweeper that runs it (`hydra/sweeper=bisection`) is
bisection_sweeper.py next to this file.

A dense grid spends most of its runs far from the frontier. This search looks for it
directly: for one combination (precision x softmax x mitigation) it bisects a value (`lr_x`)
on a log scale between `lo` and `hi`:

* round 0 runs both ends. `lo` not stable: the frontier lies below the range (`below_range`,
  nothing more is run for it); `hi` stable: above the range (`above_range`);
* every further round runs the log-midpoint of the bracket [largest stable, smallest
  unstable] and halves it, `steps` times. The bracket then spans one step of a log grid of
  2^steps + 1 points from `lo` to `hi` (every probe is a point of that grid), and its lower
  end is the largest stable value found.

A point is *stable* when the run of every seed in `seeds` ends with a status in `stable_if`
(default `[ok]`: finite AND trained). So `stalled` (finite, but the loss did not fall by the
record's train margin) counts as NOT stable, as do `nonfinite`, `diverged`, and also `error` and
`interrupted` (a failed probe is not evidence of stability); `stable_if: [ok, stalled]` asks
for finiteness alone. One failing seed makes the point unstable.

`bisect_all` runs many searches in lockstep, one batch per round, which is how the sweeper
gives the launcher every open combination's probe at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

STABLE_IF = ("ok",)

# outcome of one combination's search
OPEN, BRACKETED, BELOW, ABOVE = "open", "bracketed", "below_range", "above_range"


def fmt(x: float) -> str:
    """The shortest decimal that reads back as x (30.0 -> '30', 0.9487 -> '0.9487'), so that
    a probe's override matches the same value written by hand in another sweep."""
    x = float(x)
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)


def grid_value(lo: float, hi: float, index: int, steps: int, digits: int = 4) -> float:
    """Point `index` of the log grid of 2^steps + 1 points from lo to hi; the ends exactly,
    the inner points to `digits` significant digits."""
    n = 2**steps
    if index <= 0:
        return float(lo)
    if index >= n:
        return float(hi)
    return float(format(lo * (hi / lo) ** (index / n), f".{digits}g"))


def dense_runs(steps: int, n_seeds: int) -> int:
    """Runs of a dense log grid at the resolution of `steps` bisection steps."""
    return (2**steps + 1) * n_seeds


def is_stable(statuses: Iterable[str], stable_if: Sequence[str] = STABLE_IF) -> bool:
    """Every seed's status is in `stable_if` (and there is at least one)."""
    statuses = list(statuses)
    return bool(statuses) and all(s in stable_if for s in statuses)


class Bisection:
    """One combination's search over grid indices 0 .. 2^steps (see `grid_value`).

    `pending()` says which points to run next (both ends first, then one midpoint a round);
    `observe(index, {seed: status})` feeds the statuses back. (A plain class, not a
    dataclass: Hydra's plugin scan executes this module outside sys.modules, where
    dataclasses cannot resolve string annotations.)"""

    def __init__(
        self,
        lo: float,
        hi: float,
        steps: int,
        seeds: Sequence = (0,),
        stable_if: Sequence[str] = STABLE_IF,
        digits: int = 4,
    ) -> None:
        if not (lo > 0 and hi > lo):
            raise ValueError(f"bisection range lo={lo}, hi={hi}: need 0 < lo < hi")
        if steps < 0:
            raise ValueError(f"bisection steps={steps}: need >= 0")
        if not seeds:
            raise ValueError("bisection seeds: need at least one")
        self.lo, self.hi, self.steps = float(lo), float(hi), int(steps)
        self.seeds = tuple(seeds)
        self.stable_if = tuple(stable_if)
        self.digits = int(digits)
        self.points: dict[int, dict] = {}  # grid index -> {seed: status}
        self.i_lo: int | None = None  # largest index known stable
        self.i_hi: int | None = None  # smallest index known unstable
        self.outcome = OPEN

    @property
    def n(self) -> int:
        return 2**self.steps

    @property
    def done(self) -> bool:
        return self.outcome != OPEN

    def value(self, index: int) -> float:
        return grid_value(self.lo, self.hi, index, self.steps, self.digits)

    def stable(self, index: int) -> bool:
        return is_stable(self.points[index].values(), self.stable_if)

    def pending(self) -> list[int]:
        if self.done:
            return []
        ends = [i for i in (0, self.n) if i not in self.points]
        if ends:
            return ends
        return [(self.i_lo + self.i_hi) // 2]

    def observe(self, index: int, statuses: dict) -> None:
        """Statuses of one point, by seed; a seed without one counts as `error`."""
        if self.done or index not in self.pending():
            raise ValueError(f"point {index} was not asked for (pending: {self.pending()})")
        self.points[index] = {s: statuses.get(s, "error") for s in self.seeds}
        if self.i_hi is None:  # round 0: wait for both ends
            if 0 not in self.points or self.n not in self.points:
                return
            if not self.stable(0):
                self.outcome, self.i_hi = BELOW, 0
            elif self.stable(self.n):
                self.outcome, self.i_lo = ABOVE, self.n
            else:
                self.i_lo, self.i_hi = 0, self.n
        elif self.stable(index):
            self.i_lo = index
        else:
            self.i_hi = index
        if self.outcome == OPEN and self.i_hi - self.i_lo <= 1:
            self.outcome = BRACKETED

    @property
    def largest_stable(self) -> float | None:
        return None if self.i_lo is None else self.value(self.i_lo)

    @property
    def smallest_unstable(self) -> float | None:
        return None if self.i_hi is None else self.value(self.i_hi)

    @property
    def runs(self) -> int:
        return sum(len(v) for v in self.points.values())

    def result(self) -> dict:
        lo, hi = self.largest_stable, self.smallest_unstable
        return {
            "outcome": self.outcome,
            "largest_stable": lo,
            "smallest_unstable": hi,
            "bracket": [lo, hi],
            "bracket_ratio": hi / lo if lo and hi else None,
            "points": len(self.points),
            "runs": self.runs,
            "dense_runs": dense_runs(self.steps, len(self.seeds)),
            "probes": [
                {
                    "value": self.value(i),
                    "index": i,
                    "stable": self.stable(i),
                    "statuses": {str(s): st for s, st in by_seed.items()},
                }
                for i, by_seed in sorted(self.points.items())
            ],
        }


Evaluate = Callable[[list[tuple[int, float, Any]]], list[str]]


def bisect_all(
    searches: list[Bisection],
    evaluate: Evaluate,
    on_round: Callable[[int, int, int], None] | None = None,
) -> int:
    """Runs the searches in lockstep: each round, the pending points of every open search,
    times its seeds, go to `evaluate` as one batch of (search number, value, seed), which
    returns one status each. Returns the number of rounds."""
    rounds = 0
    while True:
        asked = [(k, i, s) for k, b in enumerate(searches) for i in b.pending() for s in b.seeds]
        if not asked:
            return rounds
        if on_round is not None:
            on_round(rounds, len(asked), sum(not b.done for b in searches))
        statuses = evaluate([(k, searches[k].value(i), s) for k, i, s in asked])
        if len(statuses) != len(asked):
            raise RuntimeError(f"evaluate returned {len(statuses)} statuses for {len(asked)} runs")
        grouped: dict[tuple[int, int], dict] = {}
        for (k, i, s), status in zip(asked, statuses):
            grouped.setdefault((k, i), {})[s] = status
        for (k, i), by_seed in grouped.items():
            searches[k].observe(i, by_seed)
        rounds += 1


def bisect(
    oracle: Callable[[float, Any], str],
    lo: float,
    hi: float,
    steps: int,
    seeds: Sequence = (0,),
    stable_if: Sequence[str] = STABLE_IF,
    digits: int = 4,
) -> dict:
    """One combination's search with `oracle(value, seed) -> status` (a test's stand-in for
    a run); the result as in frontier_bisection.json, plus `rounds`."""
    search = Bisection(lo, hi, steps, tuple(seeds), tuple(stable_if), digits)
    rounds = bisect_all([search], lambda batch: [oracle(x, s) for _, x, s in batch])
    return {**search.result(), "rounds": rounds}
