"""report.md: summary, the matrix, training vs test time, the rules, per-mechanism tables,
per-advice lines, the bf16-range claim, the frontier, and the appendix."""

from __future__ import annotations

import math

import pandas as pd

from nanlab.record import STATUSES

from .advice import advice
from .cells import OUTCOME_TEXT, OUTCOMES, TEST_FAILS, Cell
from .frontier import FRONTIER_RULE, Line, fmt_lr, frontier_frame
from .match import flatten
from .regime import regime_section
from .sensitivity import (
    MIN_LRS,
    SENSITIVITY_RULE,
    Family,
    by_group,
    tied_with_first,
    untested_advice,
)
from .summary import AdviceLine, RangePairs
from .verdicts import RULES, Mechanism, Pair


def md_table(rows: list[list], head: list[str]) -> str:
    if not rows:
        return "_(none)_\n"

    def cell(v) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
            return ""
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def _human_s(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    return f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.2f} h"


def _step(x: float | None) -> str:
    return "-" if x is None else f"{x:g}"


def _agreement(p: Pair) -> str:
    if p.measured is None:
        return f"_{p.status}_"
    a = {"refutes": "**refutes**", "disagrees": "**disagrees**"}.get(
        p.agreement or "", p.agreement or ""
    )
    return a if p.counts else f"{a} (not counted: {p.status})"


def _seeds(c: Cell | None) -> str:
    if c is None:
        return ""
    return f"{c.n_ok} ok / {c.n_failed} failing of {c.n_seeds}" + (
        f", {c.n_stalled} stalled" if c.n_stalled else ""
    )


def _test_seeds(c: Cell | None) -> str:
    return "" if c is None else c.test_counts()


def _control_text(m: Mechanism) -> str:
    c = m.control_cell
    if c is None:
        return "**not run**"
    if m.at_test:
        return (
            f"training {c.counts()}; {c.test_counts()}; test causes {c.test_causes_text() or '-'}"
        )
    return (
        f"{c.counts()}; causes {c.causes_text() or '-'}; median first bad step "
        f"{_step(c.median_bad_step)}"
    )


def mechanism_section(m: Mechanism) -> list[str]:
    b = m.base
    L = [f"### {m.label}" + (" (judged at test time)" if m.at_test else ""), ""]
    if m.text:
        L += [f"> {m.text}", ""]
    if m.reference:
        L += [f"Reference: {m.reference}", ""]
    base = f"`{' '.join(m.baseline)}`" if m.baseline else "(none in the records)"
    if b is None:
        L.append(f"- declared cause `{m.cause}`; baseline {base}: **not run**")
    elif m.at_test:
        L.append(
            f"- judged at test time: the run's test pass (its test split served batched, "
            f"`serve.*`) must fail, not training; declared cause `{m.cause}`; baseline "
            f"{base}: training {b.counts()}; {b.test_counts()}, non-finite test samples "
            f"{b.test_samples_text() or '-'} (median), served {b.test_precision or '-'} "
            f"with {b.test_padding_side or '-'} padding; failing samples "
            f"{b.test_ids_text() or '-'}; test causes {b.test_causes_text() or '-'}; "
            f"first in {b.test_module or '-'}"
        )
    else:
        frac = (
            ""
            if b.median_param_frac is None
            else (f", non-finite parameter fraction {b.median_param_frac:.2f}")
        )
        L.append(
            f"- declared cause `{m.cause}`; baseline {base}: {b.counts()}; causes "
            f"{b.causes_text() or '-'}; median first bad step "
            f"{_step(b.median_bad_step)}{frac}; {b.test_counts()}"
        )
    if m.control_overrides:
        L.append(
            f"- control (the baseline with the trigger removed) "
            f"`{' '.join(m.control_overrides)}`: " + _control_text(m)
        )
    if m.base_status != "counts":
        L.append(f"- **does not count: {m.base_status}**")
    elif m.control:
        fixes = [
            p.arm for p in m.pairs if p.counts and p.measured == "fixes" and p.predicted == "fixes"
        ]
        L.append(
            f"- positive control green: {', '.join(f'`{a}`' for a in fixes)} fixes it"
            + (" at test time" if m.at_test else "")
        )
    else:
        L.append(
            "- **positive control failed**: no prediction of `fixes` was measured as "
            "fixes; the rows below count nowhere"
        )
    L.append("")
    rows = []
    for p in m.pairs:
        c = p.cell
        measured = p.measured or ""
        if p.measured and p.detail:
            measured += f" ({p.detail})"
        head = [p.advice, f"`{p.arm}`", p.predicted, measured, _agreement(p)]
        if m.at_test:
            rows.append(
                head
                + [
                    "" if c is None else c.counts(),
                    _test_seeds(c),
                    "" if c is None else c.test_samples_text(),
                    "" if c is None else c.test_ids_text(),
                    "" if c is None else c.test_causes_text(),
                    p.why,
                ]
            )
            continue
        step = (
            ""
            if c is None
            else (
                f"{_step(b.median_bad_step if b else None)} -> "
                f"{_step(c.median_bad_step) if c.n_failed else 'none'}"
            )
        )
        rows.append(head + [_seeds(c), step, c.causes_text() if c else "", _test_seeds(c), p.why])
    if m.at_test:
        L.append(
            md_table(
                rows,
                [
                    "advice",
                    "mitigation",
                    "predicted",
                    "measured (test time)",
                    "agreement",
                    "training",
                    "test time",
                    "test samples non-finite",
                    "failing samples",
                    "test causes",
                    "why (prediction)",
                ],
            )
        )
    else:
        L.append(
            md_table(
                rows,
                [
                    "advice",
                    "mitigation",
                    "predicted",
                    "measured",
                    "agreement",
                    "seeds",
                    "first bad step",
                    "causes",
                    "test time",
                    "why (prediction)",
                ],
            )
        )
    if m.others:
        L += [
            f"{len(m.others)} other cell(s) of {m.name} matched no prediction: "
            + "; ".join(f"{c.describe(b.config) if b else c.key} ({c.counts()})" for c in m.others),
            "",
        ]
    return L


def _lr(c: Cell) -> str:
    return f"lr_x={fmt_lr(c.lr_x)}" if c.lr_x is not None else f"lr={fmt_lr(c.lr)}"


def _other_settings(cells: list[Cell]):
    """cell -> its settings that differ from the most common value over all cells (the
    precision, softmax, lr and the mechanism's own keys are columns of their own)."""
    from collections import Counter

    skip = ("precision", "softmax", "stress", "lr", "lr_x", "seed")
    flat = {
        c.key: {k: v for k, v in flatten(c.config).items() if k.split(".")[0] not in skip}
        for c in cells
    }
    keys = sorted({k for f in flat.values() for k in f})
    mode = {k: Counter(repr(f.get(k)) for f in flat.values()).most_common(1)[0][0] for k in keys}

    def other(c: Cell) -> str:
        f = flat[c.key]
        return " ".join(f"{k}={f.get(k)}" for k in keys if repr(f.get(k)) != mode[k])

    return other


def training_vs_test_section(
    df: pd.DataFrame, cells: list[Cell], mechs: list[Mechanism]
) -> list[str]:
    """Cells finite in training but non-finite at test time, and what removed it."""
    L = ["## Training vs test time", ""]
    served = df[df["test_status"].isin(["finite", "nonfinite"])] if len(df) else df
    if not len(served):
        return L + [
            (
                "_No run in these records served its test split (records written before "
                "the test-time pass, `serve.enabled=false`, or no run stayed finite)._"
            ),
            "",
        ]
    bad = int((served["test_status"] == "nonfinite").sum())
    finite_cells = [c for c in cells if c.trained_finite]
    hit = [c for c in cells if c.outcome == TEST_FAILS]
    L.append(
        f"A run that stays finite in training serves its test split afterwards "
        f"(batched, `serve.*`): {len(served)} runs served, {bad} non-finite at test time. "
        f"**{len(hit)} of the {len(finite_cells)} cells that stayed finite in training "
        "were non-finite at test time** (at least 2/3 of the seeds that ran the test "
        "pass):"
    )
    L.append("")
    other = _other_settings(cells)
    role: dict = {}
    for m in mechs:
        if m.base is not None:
            role.setdefault(m.base.key, (m.label, "baseline"))
        for p in m.pairs:
            if p.cell is not None:
                role.setdefault(p.cell.key, (m.label, f"`{p.arm}`"))

    def where(c: Cell) -> list[str]:
        mech, what = role.get(c.key, (c.stress, other(c) or ""))
        return [mech, what]

    rows = [
        [
            *where(c),
            c.precision,
            c.softmax,
            _lr(c),
            f"{c.test_precision or '-'}, {c.test_padding_side or '-'} padding",
            c.counts(),
            c.test_counts(),
            c.test_samples_text(),
            c.test_ids_text(),
            c.test_causes_text(),
            c.test_module or "",
        ]
        for c in sorted(
            hit,
            key=lambda c: (
                c.stress == "none",
                c.stress,
                role.get(c.key, ("", "~"))[1] != "baseline",
                c.precision,
                c.softmax,
                c.lr_x if c.lr_x is not None else c.lr,
            ),
        )
    ]
    L.append(
        md_table(
            rows,
            [
                "stress",
                "cell (mitigation or other settings)",
                "precision",
                "softmax",
                "lr",
                "served",
                "training",
                "test time",
                "test samples non-finite",
                "failing samples (left padding) × seeds",
                "test cause",
                "first module",
            ],
        )
    )
    judged = [m for m in mechs if m.at_test]
    if not judged:
        L += ["No mechanism in these records is judged at test time (`judged_on: test`).", ""]
        return L
    L += [
        (
            "What removed it, from the mechanisms judged at test time (the measured test-time "
            "effect of each mitigation against the baseline):"
        ),
        "",
    ]
    for m in judged:
        by: dict[str, list[str]] = {}
        for p in m.pairs:
            if p.measured is not None:
                by.setdefault(p.measured, []).append(f"`{p.arm}`")
        effects = "; ".join(
            f"{e.replace('_', ' ')}: {', '.join(by[e])}"
            for e in ("fixes", "no_effect", "worsens", "mixed")
            if e in by
        )
        effects = effects or "none measured"
        note = "" if m.counts else f" (does not count: {m.status})"
        L.append(f"- **{m.label}** (cause `{m.cause}`){note}: {effects}")
    L.append("")
    return L


def advice_section(lines: list[AdviceLine], rng: RangePairs) -> list[str]:
    L = [
        "## Per advice",
        "",
        (
            "Only pairs that count go into fixes / delays / worsens / out of scope (predicted and "
            "measured no effect) / refuted / disagrees; numbers: seeds ok k/n, median first bad "
            "step baseline -> mitigation."
        ),
        "",
    ]
    seed = [a for a in lines if a.seed]
    rest = [a for a in lines if not a.seed]

    def item(a: AdviceLine) -> str:
        note = f" _{a.note}._" if a.note else ""
        return f"- **{a.text}** (`{a.id}`; addresses {a.addresses}):{note} {a.line}"

    L += [item(a) for a in seed]
    L += ["", f"- **bf16 vs fp32 range.** {rng.line}", ""]
    if rest:
        L += ["Beyond the seed:", ""] + [item(a) for a in rest] + [""]
    return L


def frontier_section(ls: list[Line], png: str) -> list[str]:
    L = ["## Stable-lr frontier", "", f"![stable-lr frontier]({png})", "", FRONTIER_RULE, ""]
    fr = frontier_frame(ls)
    rows = [
        [
            r.precision,
            r.softmax,
            r.context,
            r.values,
            fmt_lr(r.max_ok) or "none",
            fmt_lr(r.min_failed) or "none",
            "yes" if r.monotone else "**no**",
            r.seeds,
            r.test_fails or "none",
        ]
        for r in fr.itertuples()
    ]
    L.append(
        md_table(
            rows,
            [
                "precision",
                "softmax",
                "other settings",
                "lr_x tested",
                "max_ok",
                "min_failed",
                "monotone",
                "seeds ok per lr_x",
                "non-finite at test time (lr_x)",
            ],
        )
    )
    return L


def _lrs(xs: list[float]) -> str:
    return " ".join(fmt_lr(x) for x in xs)


def sensitivity_section(fams: list[Family], png: str) -> list[str]:
    """The LR sensitivity per precision x mitigation: the rule, the figure, the table, the
    ranking; one line where the records hold no LR sweep."""
    L = ["## LR sensitivity", ""]
    groups = by_group(fams)
    if not groups:
        few = f" ({len(fams)} with fewer)" if fams else ""
        return L + [
            (
                f"_No LR sweep in these records: no family of runs (stress=none, configs "
                f"equal but for lr, lr_x and the seed) with at least {MIN_LRS} lr values"
                f"{few}._"
            ),
            "",
        ]
    L += [f"![LR sensitivity]({png})", "", SENSITIVITY_RULE, ""]
    rows = []
    for g, fs in groups.items():
        for f in fs:
            b = f.best
            seeds = f"{f.seed_range[0]:.3g}–{f.seed_range[1]:.3g}" if f.seed_range else ""
            rows.append(
                [
                    g,
                    f.rank,
                    f"`{f.label}`",
                    f.advice or "",
                    f.range_text,
                    f"{f.sensitivity:.3f}",
                    seeds,
                    f"{b.loss:.4g} @ {fmt_lr(b.x)}",
                    f"{f.ell_star:.4g}",
                    fmt_lr(f.max_all_ok) or "none",
                    f"{f.n_failed}/{f.n_runs}",
                ]
            )
    axis = "lr_x" if all(f.axis == "lr_x" for fs in groups.values() for f in fs) else "lr"
    L.append(
        md_table(
            rows,
            [
                "precision",
                "rank",
                "mitigation",
                "advice",
                f"{axis} range (n)",
                "sensitivity",
                "seeds' range",
                f"best final loss @ {axis}",
                "ℓ*",
                f"largest {axis} all seeds ok",
                "failed runs",
            ],
        )
    )
    L += ["**Ranking** (lowest sensitivity first):", ""]
    for g, fs in groups.items():
        items = []
        for f in fs:
            what = " + ".join(advice(a).text for a in f.advice.split("+")) if f.advice else ""
            items.append(
                f"{f.rank}. "
                + (f"`{f.advice}` ({what}; `{f.label}`)" if what else f"`{f.label}`")
                + f" {f.sensitivity:.3g}"
            )
        L.append(f"- **{g}**: " + "; ".join(items))
        tied = tied_with_first(fs)
        if tied:
            L.append(
                "  - not told apart from rank 1 by these seeds (seeds' ranges overlap): "
                + ", ".join(f"`{f.label}`" for f in tied)
            )
        grids = {tuple(f.xs) for f in fs}
        if len(grids) > 1:
            L.append(
                f"  - {g}: the families ran on different {axis} grids ("
                + "; ".join(f"`{f.label}`: {_lrs(f.xs)}" for f in fs)
                + "): each mean is over its own points."
            )
    L.append("")
    uncounted = [f for f in fams if not f.counts]
    if uncounted:
        L += [
            f"Not counted (fewer than {MIN_LRS} lr values): "
            + "; ".join(f"{f.group} `{f.label}` ({_lrs(f.xs) or 'no evidence'})" for f in uncounted)
            + ".",
            "",
        ]
    rest = untested_advice(fams)
    if rest:
        L += [
            "Mitigation advice with no family in this sweep: "
            + ", ".join(f"`{a}`" for a in rest)
            + ".",
            "",
        ]
    return L


def render(
    df: pd.DataFrame,
    cells: list[Cell],
    mechs: list[Mechanism],
    lines: list[AdviceLine],
    rng: RangePairs,
    ls: list[Line],
    names: dict[str, str],
    sens: list[Family] | None = None,
) -> str:
    runs = df["status"].value_counts()
    states = pd.Series([c.outcome for c in cells]).value_counts() if cells else pd.Series()
    pairs = [p for m in mechs for p in m.pairs]
    counted = [p for p in pairs if p.counts]
    agree = pd.Series([p.agreement for p in counted]).value_counts() if counted else {}
    L = ["# nanlab: NaN map report", ""]
    dropped = df.attrs.get("duplicates_dropped", 0)
    L.append(
        f"- runs: **{len(df)}**"
        + (f" ({dropped} older or interrupted duplicate records dropped)" if dropped else "")
        + "; by status: "
        + ", ".join(f"{s} {int(runs.get(s, 0))}" for s in STATUSES)
    )
    seeds = sorted({c.n_seeds for c in cells})
    L.append(
        f"- cells: **{len(cells)}** (seeds per cell: {', '.join(map(str, seeds))}); by "
        "outcome: " + "; ".join(f"{OUTCOME_TEXT[s]} {int(states.get(s, 0))}" for s in OUTCOMES)
    )
    L.append(
        f"- mechanisms: **{len(mechs)}**, {sum(m.counts for m in mechs)} count; "
        f"predictions: {len(pairs)}, {len(counted)} count: "
        + ", ".join(f"{k} {int(agree.get(k, 0))}" for k in ("agrees", "disagrees", "refutes"))
    )
    wall = float(df["wall_time_s"].fillna(0).sum())
    if wall > 0:
        L.append(f"- wall time (sum over runs): {_human_s(wall)}")
    for col, name in (
        ("device", "devices"),
        ("torch_version", "torch"),
        ("transformers_version", "transformers"),
    ):
        vals = sorted({str(v) for v in df[col].dropna() if str(v)})
        if vals:
            L.append(f"- {name}: {', '.join(vals)}")
    L += [
        "",
        f"![mechanism x mitigation]({names['matrix']})",
        "",
        (
            "Rows: mechanisms (the baseline's declared cause and median first bad step); "
            "columns: the advice and the mitigation that tests it. Colour: the measured effect; "
            "label: effect and seeds ok; **!** and a black border: the measurement disagrees "
            "with the prediction; hatched: does not count; a pink band on the left (pink text "
            "for a baseline): that cell was finite in training, non-finite at test time. Rows "
            'marked "(judged at test time)": the effect measured on the test pass (label: '
            "seeds served finite)."
        ),
        "",
    ]
    L += training_vs_test_section(df, cells, mechs)
    L += ["## Verdict rules", "", RULES]
    L += ["## Mechanisms", ""]
    if not mechs:
        L += ["_No mechanism runs (stress=...) in these records._", ""]
    for m in mechs:
        L += mechanism_section(m)
    L += advice_section(lines, rng)
    L += frontier_section(ls, names["frontier"])
    L += regime_section(df)
    L += sensitivity_section(sens or [], names.get("sensitivity", "lr_sensitivity.png"))
    L += appendix(df, cells, names["map"])
    return "\n".join(L)


def appendix(df: pd.DataFrame, cells: list[Cell], png: str) -> list[str]:
    L = ["## Appendix: every cell", "", f"![every cell]({png})", ""]
    rows = []
    for c in sorted(
        cells,
        key=lambda c: (c.stress, c.precision, c.softmax, c.lr_x if c.lr_x is not None else c.lr),
    ):
        rows.append(
            [
                c.key,
                c.stress,
                c.precision,
                c.softmax,
                _lr(c),
                OUTCOME_TEXT[c.outcome],
                c.counts(),
                c.causes_text(),
                _step(c.median_bad_step),
                c.module or "",
                c.test_counts(),
                c.test_samples_text(),
                c.test_ids_text(limit=4),
                c.test_causes_text(),
            ]
        )
    L.append(
        md_table(
            rows,
            [
                "cell",
                "stress",
                "precision",
                "softmax",
                "lr",
                "outcome",
                "seeds",
                "causes",
                "first bad step",
                "module",
                "test time",
                "test samples non-finite",
                "failing samples",
                "test causes",
            ],
        )
    )
    for status in ("error", "interrupted"):
        bad = df[df["status"] == status]
        if len(bad):
            what = bad["error"] if status == "error" else bad["signal"]
            counts = what.fillna("(no message)").astype(str).str.slice(0, 160).value_counts()
            L += ["", f"### {status.capitalize()} runs (no evidence)", ""]
            L.append(md_table([[int(k), v] for v, k in counts.items()], ["runs", status]))
    return L
