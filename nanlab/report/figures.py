"""The headline figures: the mechanism x mitigation matrix and the stable-lr frontier.

Matplotlib's object API on an Agg canvas (no pyplot state, no display needed).
"""

from __future__ import annotations

import os
import textwrap
from itertools import pairwise
from pathlib import Path

from .advice import ordered
from .cells import OUTCOME_TEXT, TEST_FAILS
from .frontier import Line, fmt_lr
from .sensitivity import Family, by_group
from .verdicts import Mechanism, Pair

EFFECT_COLORS = {
    "fixes": "#1a9850",
    "delays": "#d9ef8b",
    "no_effect": "#bdbdbd",
    "worsens": "#d73027",
    "stalls": "#9e9ac8",
    "mixed": "#fdae61",
}
EFFECT_SHORT = {
    "fixes": "fixes",
    "delays": "delays",
    "no_effect": "no effect",
    "worsens": "worsens",
    "stalls": "stalls",
    "mixed": "mixed",
}
PRECISION_COLORS = {
    "fp32": "#1f77b4",
    "bf16": "#d62728",
    "bf16_true": "#ff7f0e",
    "fp16": "#9467bd",
    "progressive": "#2ca02c",
}
# finite in training, non-finite at test time: its own colour in every figure
TEST_FAILS_COLOR = "#e7298a"
TEST_FAILS_TEXT = OUTCOME_TEXT[TEST_FAILS]
STATE_COLORS = {
    "ok": "#1a9850",
    "stalls": "#9e9ac8",
    "mixed": "#fdae61",
    "nonfinite": "#b2182b",
    "diverged": "#f46d43",
    "none": "#ffffff",
    TEST_FAILS: TEST_FAILS_COLOR,
}


def _figure(w: float, h: float, dpi: int = 110):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _lum(color: str) -> float:
    from matplotlib.colors import to_rgb

    r, g, b = to_rgb(color)
    return 0.299 * r + 0.587 * g + 0.114 * b


def _empty(path: Path, text: str):
    fig = _figure(5, 1.5)
    fig.text(0.5, 0.5, text, ha="center", va="center", fontsize=11)
    fig.savefig(path)
    return fig


def arms(mechs: list[Mechanism]) -> list[tuple[str, str]]:
    """The matrix's columns: (advice, mitigation), the seed's advice first."""
    seen = {(p.advice, p.arm) for m in mechs for p in m.pairs}
    rank = {a: i for i, a in enumerate(ordered({a for a, _ in seen}))}
    return sorted(seen, key=lambda x: (rank[x[0]], x[1]))


def _pair_text(p: Pair) -> tuple[str, str, str]:
    """(fill colour, label, mark) for one matrix cell."""
    c = p.cell
    if p.measured is None:
        if p.status == "not run":
            return "#ffffff", "not run", ""
        if p.status.startswith("excluded"):
            return "#ffffff", "excluded\n(acted late)", ""
        if p.status.startswith("too few"):
            return "#ffffff", f"too few\nseeds ({c.n_seeds if c else 0})", ""
        return "#f0f0f0", f"{c.n_ok}/{c.n_seeds} ok" if c else "", ""
    label = EFFECT_SHORT[p.measured]
    if c is None:  # a measured pair has its cell; kept for the type checker
        return "#ffffff", label, ""
    if p.measured == "delays" and p.factor:
        label += f" {p.factor:.1f}x"
    label += (
        f"\n{c.n_test_finite}/{c.n_seeds} test ok" if p.at_test else f"\n{c.n_ok}/{c.n_seeds} ok"
    )
    mark = ""
    if p.agreement == "refutes":
        mark = f"refutes\n(pred. {p.predicted})"
    elif p.agreement == "disagrees":
        mark = f"pred. {EFFECT_SHORT.get(p.predicted, p.predicted)}"
    return EFFECT_COLORS[p.measured], label, mark


def _arm_label(arm: str, width: int = 30) -> str:
    """The mitigation's overrides, wrapped at spaces (then after a '=') to `width`."""
    out: list[str] = []
    for o in arm.split():
        if out and len(out[-1]) + 1 + len(o) <= width:
            out[-1] += " " + o
            continue
        k, eq, v = o.partition("=")
        out += [o] if len(o) <= width else [k + eq, v]
    return "\n".join(out)


def _row_label(m: Mechanism) -> tuple[str, str]:
    """(the mechanism's header: name, the baseline's cause, step and failures; the note on
    why it does not count, or "")."""
    b = m.base
    cause = m.cause.replace(" or ", " or\n")  # several declared causes: one a line
    if b is None:
        head = f"{m.label}\n{cause}: baseline not run"
    elif m.at_test:
        head = (
            f"{m.label}\n(judged at test time)\n{cause} at test · "
            f"{b.n_test_failed_with(m.cause)}/{b.n_seeds} failed"
        )
    else:
        step = "-" if b.median_bad_step is None else f"{b.median_bad_step:g}"
        head = f"{m.label}\n{cause} @ step {step} · {b.n_failed}/{b.n_seeds} failed"
    note = "" if m.counts else "✗ " + m.status
    return head, note


def _wrap(text: str, width: int) -> list[str]:
    """Lines of at most `width` characters; a longer name breaks after an underscore."""

    def words(line: str):
        for word in line.split(" "):
            while len(word) > width and "_" in word[1:width]:
                cut = word.rindex("_", 1, width) + 1
                yield word[:cut]
                word = word[cut:]
            yield word

    out = []
    for line in text.split("\n"):
        out += textwrap.wrap(" ".join(words(line)), width, break_long_words=False) or [""]
    return out


def _seed_advice(advice_id: str) -> bool:
    from .advice import ADVICE

    return advice_id in ADVICE and ADVICE[advice_id].seed


def draw_matrix(mechs: list[Mechanism], path: str | os.PathLike):
    """mitigation x mechanism (a mitigation a row, grouped by its advice: the seed's advice,
    then beyond the seed; a mechanism a column): colour = measured effect, label = effect +
    k/n seeds ok; a black border and a red "!" where the measurement disagrees with the
    prediction; hatched where the pair does not count (baseline, control or positive control failed);
    a band in TEST_FAILS_COLOR on the left where the cell was finite in training but
    non-finite at test time (the baseline's too, by the column header). Columns judged at
    test time say so, and their label counts seeds served finite. A mitigation a row keeps
    the figure ~1,500 px wide at any number of arms (31 columns were 3,257 px)."""
    from matplotlib.patches import Circle, Rectangle

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = arms(mechs)
    if not mechs or not rows:
        return _empty(
            path, "no mechanism predictions in these records\n(config['stress'] carries none)"
        )
    # inches: label columns (advice, mitigation), the grid, the header of mechanism columns
    adv_w, arm_w, right = 1.75, 1.95, 0.2
    cw = min(1.45, max(1.05, (14.0 - adv_w - arm_w - right) / len(mechs)))
    rh, sec_h = 0.44, 0.3
    w = adv_w + arm_w + cw * len(mechs) + right
    chars = int(cw * 14.5)  # characters of 7.5 pt text a column holds
    heads = [_row_label(m) for m in mechs]
    # inches of header: the names' row (8 pt bold lines), then the details and notes
    name_lines = max(len(_wrap(h.split("\n")[0], chars)) for h, _ in heads)
    below = max(
        0.107 * len(_wrap("\n".join(h.split("\n")[1:]), chars))
        + (0.1 * len(_wrap(n, chars + 4)) + 0.04 if n else 0)
        for h, n in heads
    )
    head_h = 0.14 + 0.125 * name_lines + below
    sections = [
        (seed, [i for i, (a, _) in enumerate(rows) if _seed_advice(a) == seed])
        for seed in (True, False)
    ]
    sections = [(seed, idx) for seed, idx in sections if idx]
    handles = _matrix_legend()
    ncol = 5 if w < 12 else 6
    subtitle = textwrap.wrap(
        "a row per mitigation, grouped by the advice it tests; a column "
        "per NaN mechanism, under it the baseline's cause @ median first "
        "bad step and seeds failed. Colour = measured effect vs that "
        "baseline; label: effect, seeds ok k/n (columns judged at test "
        "time: seeds served finite)",
        int(w * 15),
    )
    top = 0.55 + 0.15 * len(subtitle)
    bottom = 0.25 + 0.2 * -(-len(handles) // ncol)
    grid_h = rh * len(rows) + sec_h * len(sections)
    h = top + head_h + grid_h + bottom
    fig = _figure(w, h)
    x0 = adv_w + arm_w
    ax = fig.add_axes((x0 / w, bottom / h, cw * len(mechs) / w, grid_h / h))
    # axes units: a column is 1 wide; y in inches from the grid's top (rows vary in kind)
    ax.set_xlim(0, len(mechs))
    ax.set_ylim(grid_h, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    for sp in ax.spines.values():
        sp.set_visible(False)
    inch = len(mechs) / (cw * len(mechs))  # x axes units per inch
    # column headers: one per mechanism
    for c, (m, (head, note)) in enumerate(zip(mechs, heads)):
        kw = {
            "ha": "center",
            "va": "bottom",
            "fontsize": 7.5 if not m.at_test else 7,
            "linespacing": 1.1,
            "fontweight": "bold" if m.counts else "normal",
            "clip_on": False,
        }
        y = -0.08
        if note:
            lines = _wrap(note, chars + 4)
            ax.text(
                c + 0.5,
                y,
                "\n".join(lines),
                ha="center",
                va="bottom",
                fontsize=6.3,
                color="#b2182b",
                style="italic",
                clip_on=False,
                linespacing=1.1,
            )
            y -= 0.1 * len(lines) + 0.04
        name, *rest = head.split("\n")
        details = _wrap("\n".join(rest[:-1]), chars)  # the baseline's line: `last`
        last = _wrap(rest[-1], chars)
        detail_kw = {**kw, "fontweight": "normal", "fontsize": 7}
        if m.base is not None and m.base.outcome == TEST_FAILS:
            # the baseline's line in the test-time colour: finite in training, not at test
            ax.text(c + 0.5, y, "\n".join(details + [""] * len(last)), **detail_kw)
            ax.text(
                c + 0.5,
                y,
                "\n".join([""] * len(details) + last),
                **{**detail_kw, "color": TEST_FAILS_COLOR},
            )
        else:
            ax.text(c + 0.5, y, "\n".join(details + last), **detail_kw)
        ax.text(
            c + 0.5,
            -head_h + 0.04,
            "\n".join(_wrap(name, chars)),  # names in a row
            **{**kw, "va": "top"},
        )
        if c:
            ax.plot([c, c], [-0.05, grid_h], color="#d0d0d0", lw=0.6, clip_on=False)
    col = {id(m): c for c, m in enumerate(mechs)}
    y_of: dict[int, float] = {}
    y = 0.0
    for seed, idx in sections:
        ax.text(
            -(adv_w + arm_w) * inch + 0.02,
            y + sec_h * 0.55,
            "the seed's advice" if seed else "beyond the seed",
            ha="left",
            va="center",
            fontsize=8.5,
            fontweight="bold",
            color="#404040",
            clip_on=False,
        )
        ax.plot(
            [-(adv_w + arm_w) * inch, len(mechs)],
            [y + sec_h - 0.02] * 2,
            color="#404040",
            lw=1.0,
            clip_on=False,
        )
        y += sec_h
        for i in idx:
            y_of[i] = y
            y += rh
    # advice groups (a label and a rule across each group) and the mitigations' overrides
    for i, (advice, arm) in enumerate(rows):
        ry = y_of[i]
        ax.text(
            -0.06,
            ry + rh / 2,
            _arm_label(arm),
            ha="right",
            va="center",
            fontsize=7,
            clip_on=False,
            linespacing=1.1,
            family="monospace",
        )
        if i == 0 or rows[i - 1][0] != advice:
            n = sum(1 for a, _ in rows if a == advice)
            ax.text(
                -(adv_w + arm_w) * inch + 0.02,
                ry + rh * n / 2,
                "\n".join(textwrap.wrap(advice.replace("_", " "), 22)),
                ha="left",
                va="center",
                fontsize=7.5,
                fontweight="bold",
                clip_on=False,
            )
            if i and y_of[i - 1] + rh == ry:  # not under a section's rule
                ax.plot(
                    [-(adv_w + arm_w) * inch, len(mechs)],
                    [ry, ry],
                    color="#909090",
                    lw=0.7,
                    clip_on=False,
                )
        for c in range(len(mechs)):
            ax.add_patch(
                Rectangle((c, ry), 1, rh, facecolor="#fafafa", edgecolor="#e0e0e0", linewidth=0.5)
            )
    for m in mechs:
        c = col[id(m)]
        for p in m.pairs:
            ry = y_of[rows.index((p.advice, p.arm))]
            fill, label, mark = _pair_text(p)
            dim = not p.counts and p.measured is not None
            ax.add_patch(
                Rectangle(
                    (c + 0.025, ry + 0.025),
                    0.95,
                    rh - 0.05,
                    facecolor=fill,
                    edgecolor="#707070" if dim else "#ffffff",
                    linewidth=0.6,
                    hatch="////" if dim else None,
                    alpha=0.55 if dim else 1.0,
                )
            )
            if p.cell is not None and p.cell.outcome == TEST_FAILS:
                ax.add_patch(
                    Rectangle(
                        (c + 0.025, ry + 0.025),
                        0.1,
                        rh - 0.05,
                        facecolor=TEST_FAILS_COLOR,
                        edgecolor="none",
                    )
                )
            txt = "black" if _lum(fill) > 0.5 or dim else "white"
            if mark:  # the label, and under it what was predicted
                ax.text(
                    c + 0.5,
                    ry + 0.16,
                    label.replace("\n", " · "),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color=txt,
                )
                ax.text(
                    c + 0.5,
                    ry + 0.3,
                    mark.replace("\n", " "),
                    ha="center",
                    va="center",
                    fontsize=6.5,
                    color=txt,
                    fontweight="bold",
                )
                ax.add_patch(
                    Rectangle(
                        (c + 0.035, ry + 0.035),
                        0.93,
                        rh - 0.07,
                        fill=False,
                        edgecolor="black",
                        linewidth=2.4,
                    )
                )
                ax.add_patch(
                    Circle(
                        (c + 0.93, ry + 0.1),
                        0.05,
                        facecolor="#e41a1c",
                        edgecolor="white",
                        linewidth=0.8,
                    )
                )
                ax.text(
                    c + 0.93,
                    ry + 0.105,
                    "!",
                    ha="center",
                    va="center",
                    fontsize=6.5,
                    color="white",
                    fontweight="bold",
                )
            else:
                ax.text(
                    c + 0.5,
                    ry + rh / 2,
                    label,
                    ha="center",
                    va="center",
                    fontsize=7.5,
                    color=txt,
                    linespacing=1.1,
                )
    fig.text(
        0.5,
        1 - 0.12 / h,
        "Which advice fixes which NaN mechanism: measured on the map",
        ha="center",
        va="top",
        fontsize=12,
        fontweight="bold",
    )
    fig.text(
        0.5, 1 - 0.42 / h, "\n".join(subtitle), ha="center", va="top", fontsize=7.5, color="#333333"
    )
    fig.legend(
        handles=handles,
        loc="lower center",
        ncol=ncol,
        fontsize=7.5,
        frameon=False,
        bbox_to_anchor=(0.5, 0.01),
    )
    fig.savefig(path)
    return fig


def _matrix_legend() -> list:
    from matplotlib.patches import Patch

    handles = [
        Patch(facecolor=c, edgecolor="#707070", label=EFFECT_SHORT[e])
        for e, c in EFFECT_COLORS.items()
    ]
    return handles + [
        Patch(facecolor=TEST_FAILS_COLOR, edgecolor="#707070", label=f"band: {TEST_FAILS_TEXT}"),
        Patch(
            facecolor="#ffffff",
            edgecolor="black",
            linewidth=2.2,
            label="! disagrees with the prediction",
        ),
        Patch(
            facecolor="#bdbdbd",
            edgecolor="#707070",
            hatch="////",
            alpha=0.55,
            label="does not count (baseline / control / positive control failed)",
        ),
    ]


def draw_frontier(lines: list[Line], path: str | os.PathLike):
    """Fraction of seeds ok against lr_x (log), one line per precision x softmax; an x
    marks an lr_x where some seed failed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not lines:
        return _empty(path, "no core cells (stress=none) in these records")
    from matplotlib import colormaps
    from matplotlib.lines import Line2D

    fig = _figure(8.5, 4.6)
    ax = fig.add_axes((0.08, 0.13, 0.58, 0.76))
    cmap = colormaps["tab10"]
    precisions = list(dict.fromkeys(ln.precision for ln in lines))
    colors = {p: PRECISION_COLORS.get(p, cmap(i % 10)) for i, p in enumerate(precisions)}
    styles = {"naive": "-", "stable": "--", "sdpa": ":", "eager": "-.", "safe": (0, (5, 1))}
    markers = {"naive": "o", "stable": "s", "sdpa": "^", "eager": "D", "safe": "v"}
    jitter = {ln.label: (i - (len(lines) - 1) / 2) * 0.008 for i, ln in enumerate(lines)}
    for i, ln in enumerate(lines):
        xs = [x for x, c in ln.points]
        ys = [c.n_ok / c.n_seeds + jitter[ln.label] for _, c in ln.points]
        color = colors[ln.precision]
        ax.plot(
            xs,
            ys,
            linestyle=styles.get(ln.softmax, "-"),
            marker=markers.get(ln.softmax, "o"),
            ms=4,
            lw=1.6,
            color=color,
            label=ln.label,
        )
        for x, c in ln.points:
            y = c.n_ok / c.n_seeds + jitter[ln.label]
            if c.n_failed:
                ax.plot([x], [y], marker="x", ms=9, mew=2, color=color)
            if c.outcome == TEST_FAILS:
                ax.plot(
                    [x], [y], marker="o", ms=13, mew=2.2, mfc="none", mec=TEST_FAILS_COLOR, zorder=5
                )
    ax.set_xscale("log")
    axis = lines[0].axis
    ax.set_xlabel("lr_x (lr / model.ref_lr)" if axis == "lr_x" else "learning rate")
    ax.set_ylabel("fraction of seeds ok (finite and trained)")
    ax.set_ylim(-0.08, 1.08)
    xs = sorted({x for ln in lines for x, _ in ln.points})
    ax.set_xticks(xs)
    ax.set_xticklabels([fmt_lr(x) for x in xs])
    ax.set_xticks([], minor=True)  # log-axis minor labels (4e-1, ...) only clutter it
    ax.grid(True, which="major", alpha=0.3)
    ax.set_title("Stable-lr frontier of the core map (stress=none)", fontsize=10, fontweight="bold")
    handles, labels = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], marker="x", ms=8, mew=2, color="#333333", lw=0))
    labels.append("some seed failed")
    if any(ln.test_fails for ln in lines):
        handles.append(
            Line2D([], [], marker="o", ms=11, mew=2.2, mfc="none", mec=TEST_FAILS_COLOR, lw=0)
        )
        labels.append("finite in training,\nnon-finite at test time")
    fig.legend(
        handles,
        labels,
        loc="center left",
        bbox_to_anchor=(0.68, 0.5),
        fontsize=7.5,
        frameon=False,
        title="precision · softmax",
        title_fontsize=8,
    )
    fig.savefig(path, bbox_inches="tight")  # long mitigation labels: grow, do not cut
    return fig


def draw_sensitivity(fams: list[Family], path: str | os.PathLike):
    """Final loss against lr_x (log), one panel per precision, one line per mitigation
    (legend in rank order, with the sensitivity): the line is min(l(lr), l0) over the seeds;
    an x marks a failed run (non-finite or diverged), drawn at its initial loss l0; dashed:
    l*, the precision's best; dotted: the median l0."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    groups = by_group(fams)
    if not groups:
        return _empty(path, "no LR sweep in these records\n(no family with >= 3 lr values)")
    from matplotlib import colormaps
    from matplotlib.lines import Line2D

    n = max(len(fs) for fs in groups.values())
    # panels within 14.3 in (1,573 px at 110 dpi) in all: readable at 1,600 px unscaled
    pw, ph, leg = min(5.4, 14.3 / len(groups)), 3.9, 0.55 + 0.2 * (n + 3)
    fig = _figure(pw * len(groups), ph + leg + 0.5)
    h = ph + leg + 0.5
    # one colour per mitigation in every panel; the plain family black, under the others
    labels = sorted({f.label for fs in groups.values() for f in fs} - {"none"})
    cmap = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    colors = {lb: cmap(i % cmap.N) for i, lb in enumerate(labels)} | {"none": "black"}
    for i, (g, fs) in enumerate(groups.items()):
        ax = fig.add_axes(
            (
                (i * pw + 0.75) / (pw * len(groups)),
                (leg + 0.45) / h,
                (pw - 1.0) / (pw * len(groups)),
                (ph - 0.45) / h,
            )
        )
        for j, f in enumerate(fs):
            color = colors[f.label]
            lw, z = (2.2, 1.9) if f.label == "none" else (1.5, 2)
            shift = 10 ** (0.015 * (j - (len(fs) - 1) / 2))  # side by side, not on top
            xs = [p.x * shift for p in f.points]
            ax.plot(
                xs,
                [p.loss for p in f.points],
                lw=lw,
                color=color,
                marker="o",
                ms=3.5,
                zorder=z,
                label=f"{f.rank}. {f.name}  ({f.sensitivity:.3f})",
            )
            bad = [(p.x * shift, e) for p in f.points for e in p.failed]
            if bad:
                ax.plot(*zip(*bad), ls="none", marker="x", ms=8, mew=2, color=color, zorder=3)
        star = fs[0].ell_star
        ell0 = sorted(e for f in fs for p in f.points for e in p.ell0s)
        ax.axhline(star, color="#555555", ls="--", lw=1)
        ax.axhline(ell0[len(ell0) // 2], color="#999999", ls=":", lw=1.2)
        ax.set_xscale("log")
        xs = sorted({x for f in fs for x in f.xs})
        ax.set_xticks(xs)
        crowded = any(a <= 0 or b / a < 2.5 for a, b in pairwise(xs))
        ax.set_xticklabels(
            [fmt_lr(x) for x in xs],
            fontsize=7,
            rotation=55 if crowded else 0,
            ha="right" if crowded else "center",
        )
        ax.set_xticks([], minor=True)
        ax.grid(True, which="major", alpha=0.3)
        ax.set_xlabel("lr_x (lr / model.ref_lr)" if fs[0].axis == "lr_x" else "learning rate")
        ax.set_ylabel("final loss: min(ℓ(lr), ℓ₀), mean over seeds")
        ax.set_title(f"{g}: ℓ* = {star:.4g}", fontsize=9.5, fontweight="bold")
        handles, labels = ax.get_legend_handles_labels()
        handles += [
            Line2D([], [], marker="x", ms=7, mew=2, color="#333333", lw=0),
            Line2D([], [], color="#555555", ls="--", lw=1),
            Line2D([], [], color="#999999", ls=":", lw=1.2),
        ]
        labels += [
            "failed run, at its initial loss ℓ₀",
            "ℓ*: the precision's best",
            "ℓ₀: initial loss (median)",
        ]
        ax.legend(
            handles,
            labels,
            loc="upper left",
            bbox_to_anchor=(-0.12, -0.21),
            fontsize=7,
            frameon=False,
            title="rank. mitigation (sensitivity)",
            title_fontsize=7.5,
            alignment="left",
        )
    fig.text(
        0.5,
        1 - 0.1 / h,
        "LR sensitivity: final loss against lr per mitigation (Wortsman et al. 2023)",
        ha="center",
        va="top",
        fontsize=11,
        fontweight="bold",
    )
    fig.savefig(path)
    return fig
