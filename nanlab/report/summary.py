"""Per advice: one line over every mechanism it was tested on; the seed's bf16-range claim.

Only pairs that count (baseline failed with its cause, positive control green, acted in
time, enough seeds) go into "fixes / delays / worsens / out of scope / refuted /
disagrees"; the rest are listed after "not counted" with the reason. Mechanisms judged at
test time (judged_on: test) give a second part, "test time: fixes M / no effect on M / ...",
by the measured test-time effect: whether the advice changes what serving the model does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from .advice import ADVICE, advice, ordered, range_facts
from .cells import TEST_FAILS, Cell
from .match import equal_except
from .verdicts import COUNTS, Mechanism, Pair

BUCKETS = ("fixes", "delays", "worsens", "out of scope for", "refuted on", "disagrees on")
TEST_BUCKETS = {
    "fixes": "fixes",
    "worsens": "worsens",
    "no_effect": "no effect on",
    "mixed": "mixed on",
}


@dataclass
class AdviceLine:
    id: str
    text: str
    addresses: str
    note: str
    seed: bool
    buckets: dict[str, list[str]] = field(default_factory=dict)
    not_counted: dict[str, list[str]] = field(default_factory=dict)  # reason -> where
    evidence: str = ""  # monitor: the causes the monitor named
    test_buckets: dict[str, list[str]] = field(default_factory=dict)  # judged at test time
    test_not_counted: dict[str, list[str]] = field(default_factory=dict)

    @property
    def train_line(self) -> str:
        parts = [f"{b} {', '.join(v)}" for b in BUCKETS if (v := self.buckets.get(b))]
        if self.not_counted:
            parts.append(_not_counted(self.not_counted))
        if self.evidence:
            parts.insert(0, self.evidence)
        return "; ".join(parts)

    @property
    def test_line(self) -> str:
        """'test time: fixes M (...); no effect on N (...)' from the test-judged mechanisms."""
        parts = [
            f"{b} {', '.join(v)}" for b in TEST_BUCKETS.values() if (v := self.test_buckets.get(b))
        ]
        if self.test_not_counted:
            parts.append(_not_counted(self.test_not_counted))
        return ("test time: " + "; ".join(parts)) if parts else ""

    @property
    def line(self) -> str:
        """The training-time line, then the test-time one."""
        train, test = self.train_line, self.test_line
        if not test:
            return train or "not tested by the map"
        return f"{train or 'not tested in training'}. {test[0].upper()}{test[1:]}"


def _not_counted(d: dict[str, list[str]]) -> str:
    return "not counted: " + "; ".join(f"{', '.join(v)} ({why})" for why, v in d.items())


def _why_not(p: Pair, m: Mechanism) -> tuple[str, str]:
    """(reason, where) for a pair that does not count; mechanism-wide reasons are short
    (the mechanism's section has the numbers)."""
    if m.base_status != COUNTS:
        short = {
            "baseline did not fail at test time": "baseline did not fail at test time with its cause",
            "baseline did not fail": "baseline did not fail with its cause",
            "too few seeds": "too few seeds in the baseline",
            "baseline not run": "baseline not run",
        }
        for head, why in short.items():
            if m.base_status.startswith(head):
                return why, m.label
        return m.base_status, m.label
    if p.status.startswith("positive control failed"):
        return "positive control failed", m.label
    return p.status, f"{m.label} [{p.arm}]"


def _samples(c: Cell) -> str:
    k = c.median_test_nonfinite
    return f"{'-' if k is None else f'{k:g}'}/{c.test_samples}"


def _numbers(p: Pair, m: Mechanism) -> str:
    b, c = m.base, p.cell
    if c is None or b is None:
        return p.arm
    if m.at_test:
        return (
            f"{p.arm}: {c.n_test_finite}/{c.n_seeds} seeds served finite, non-finite test "
            f"samples {_samples(b)} -> {_samples(c)}"
        )
    f = "-" if b.median_bad_step is None else f"{b.median_bad_step:g}"
    g = "none" if c.median_bad_step is None else f"{c.median_bad_step:g}"
    k = f", {p.factor:.1f}x" if p.measured == "delays" and p.factor else ""
    k += ", stalls: finite, not trained" if p.measured == "stalls" else ""
    if c.outcome == TEST_FAILS:
        k += f"; but non-finite at test time: {c.test_counts().replace(' at test time', '')}"
    return f"{p.arm}: {c.n_ok}/{c.n_seeds} seeds ok, first bad step {f} -> {g}{k}"


def _bucket(p: Pair) -> str:
    if not p.counts:
        return "not counted"
    if p.agreement == "refutes":
        return "refuted on"
    if p.agreement == "disagrees":
        return "disagrees on"
    if p.predicted == "no_effect":
        return "out of scope for"
    return {"fixes": "fixes", "delays": "delays", "worsens": "worsens"}.get(
        p.predicted, "disagrees on"
    )


def advice_lines(mechs: list[Mechanism], cells: list[Cell]) -> list[AdviceLine]:
    pairs = [(p, m) for m in mechs for p in m.pairs]
    ids = ordered([*ADVICE, *(p.advice for p, _ in pairs)])
    out = []
    for id_ in ids:
        a = advice(id_)
        line = AdviceLine(id_, a.text, a.addresses, a.note, a.seed)
        for p, m in pairs:
            if p.advice != id_:
                continue
            if m.at_test:
                _test_item(line, p, m)
                continue
            b = _bucket(p)
            text = f"{m.label} ({_numbers(p, m)})"
            if b in ("refuted on", "disagrees on"):
                text = (
                    f"{m.label} ({p.arm}: predicted {p.predicted}, measured "
                    f"{p.measured}: {p.detail})"
                )
            elif b == "not counted":
                why, where = _why_not(p, m)
                if where not in line.not_counted.setdefault(why, []):
                    line.not_counted[why].append(where)
                continue
            line.buckets.setdefault(b, []).append(text)
        if id_ == "monitor":
            line.evidence = monitor_evidence(cells)
        out.append(line)
    return out


def _test_item(line: AdviceLine, p: Pair, m: Mechanism) -> None:
    """A test-judged pair into the advice's test-time part, by its measured effect."""
    if not p.counts:
        why, where = _why_not(p, m)
        if where not in line.test_not_counted.setdefault(why, []):
            line.test_not_counted[why].append(where)
        return
    text = _numbers(p, m)
    if p.agreement in ("refutes", "disagrees"):
        text += f"; predicted {p.predicted}: {p.agreement}"
    bucket = TEST_BUCKETS.get(p.measured or "", "mixed on")
    line.test_buckets.setdefault(bucket, []).append(f"{m.label} ({text})")


def _named(counts: list[dict[str, int]], what: str) -> str:
    total: dict[str, int] = {}
    for d in counts:
        for k, n in d.items():
            total[k] = total.get(k, 0) + n
    runs = sum(total.values())
    named = sum(n for k, n in total.items() if k not in ("unknown", "none"))
    top = ", ".join(f"{k} {n}" for k, n in sorted(total.items(), key=lambda kv: -kv[1]))
    return f"for {named} of {runs} {what} ({named / runs:.0%}; {top})"


def monitor_evidence(cells: list[Cell]) -> str:
    failed = sum(c.n_failed for c in cells)
    served = sum(c.n_test_nonfinite for c in cells)
    if not failed and not served:
        return "no failing run to name a cause for"
    parts = []
    if failed:
        parts.append(
            "on planted mechanisms (every failure of this map was made by a mechanism "
            "or a softmax variant the monitor was written for, so this is no evidence "
            "that it names the cause of an unplanned failure), the monitor named a "
            "cause " + _named([c.causes for c in cells], "failing runs")
        )
    if served:
        parts.append(
            ("at test time " if failed else "the monitor named a cause at test time ")
            + _named([c.test_causes for c in cells], "non-finite test passes")
        )
    return "; ".join(parts)


# --- "bf16 has a smaller range than fp32" ---------------------------------------------------


@dataclass
class RangePairs:
    n: int = 0
    same: int = 0
    differ: list[str] = field(default_factory=list)
    few_seeds: int = 0

    @property
    def line(self) -> str:
        head = 'The seed\'s claim "bf16 has a smaller range than fp32": ' + range_facts()
        if not self.n:
            return head + " The map has no pair of cells differing only in fp32 vs bf16."
        s = (
            f" The map's {self.n} pairs of cells that differ only in precision fp32 vs bf16: "
            f"{self.same} had the same outcome"
        )
        if self.differ:
            s += "; different: " + "; ".join(self.differ)
        if self.few_seeds:
            s += f" ({self.few_seeds} of the pairs have a cell with fewer than 3 seeds)"
        s += (
            ". What this can detect: a mechanism of the map whose outcome depends on the "
            "exponent range; the map's mechanisms were built to fail the same in both (or "
            "not at all), so equal outcomes here are no evidence that bf16's range is enough "
            "for a failure the map does not plant"
        )
        return head + s + "."


def range_pairs(cells: list[Cell]) -> RangePairs:
    fp32 = [c for c in cells if c.precision == "fp32" and c.n_seeds]
    bf16 = [c for c in cells if c.precision == "bf16" and c.n_seeds]
    r = RangePairs()
    for a in fp32:
        for b in bf16:
            if not equal_except(a.config, b.config, ["precision"]):
                continue
            r.n += 1
            r.few_seeds += int(not (a.enough_seeds and b.enough_seeds))
            if a.state == b.state:
                r.same += 1
            else:
                r.differ.append(
                    f"{_where(a)}: fp32 {a.state} ({a.counts()}), bf16 {b.state} ({b.counts()})"
                )
    return r


def _where(c: Cell) -> str:
    lr = f"lr_x={c.lr_x:g}" if c.lr_x is not None else f"lr={c.lr:g}"
    return f"stress={c.stress} softmax={c.softmax} {lr}"


def pairs_frame(mechs: list[Mechanism]) -> pd.DataFrame:
    """One row per (mechanism, prediction): verdicts.csv and the notebook's table."""
    rows = []
    for m in mechs:
        b = m.base
        for p in m.pairs:
            c = p.cell
            rows.append(
                {
                    "mechanism": m.label,
                    "cause": m.cause,
                    "advice": p.advice,
                    "mitigation": p.arm,
                    "predicted": p.predicted,
                    "measured": p.measured,
                    "agreement": p.agreement,
                    "status": p.status,
                    "counts": p.counts,
                    "detail": p.detail,
                    "factor": p.factor,
                    "base_seeds": b.n_seeds if b else None,
                    "base_failed": b.n_failed if b else None,
                    "base_bad_step": b.median_bad_step if b else None,
                    "base_param_frac": b.median_param_frac if b else None,
                    "base_causes": b.causes_text() if b else None,
                    "seeds": c.n_seeds if c else None,
                    "seeds_ok": c.n_ok if c else None,
                    "seeds_failed": c.n_failed if c else None,
                    "bad_step": c.median_bad_step if c else None,
                    "param_frac": c.median_param_frac if c else None,
                    "causes": c.causes_text() if c else None,
                    "why": p.why,
                    "base_cell": b.key if b else None,
                    "cell": c.key if c else None,
                    "judged_on": m.judged_on,
                    "base_test_seeds_nonfinite": b.n_test_nonfinite if b else None,
                    "base_test_samples_nonfinite": b.median_test_nonfinite if b else None,
                    "base_test_causes": b.test_causes_text() if b else None,
                    "base_test_ids": b.test_ids_text() if b else None,
                    "test_seeds_finite": c.n_test_finite if c else None,
                    "test_seeds_nonfinite": c.n_test_nonfinite if c else None,
                    "test_samples_nonfinite": c.median_test_nonfinite if c else None,
                    "test_samples": c.test_samples if c else None,
                    "test_causes": c.test_causes_text() if c else None,
                    "test_ids": c.test_ids_text() if c else None,
                }
            )
    return pd.DataFrame(rows)
