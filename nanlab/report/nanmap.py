"""Appendix figure: every cell of the map, one panel per combination of other settings.

Rows precision x softmax, columns lr_x (lr where a record has none); a panel for each
combination of the settings (stress, guard, warmup, data.*, ...) that differ between cells.
Each panel shows only its own rows and columns, so no panel is empty.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from .cells import TEST_FAILS, Cell, lr_axis
from .figures import STATE_COLORS, TEST_FAILS_TEXT, _empty, _figure, _lum
from .frontier import PRECISION_ORDER, SOFTMAX_ORDER, _order, fmt_lr
from .match import flatten

ROW_KEYS = ("seed", "lr", "lr_x", "precision", "softmax")


def _leaves(c: Cell) -> dict:
    return {k: v for k, v in flatten(c.config).items() if k not in ROW_KEYS}


def facet_keys(cells: list[Cell]) -> list[str]:
    """Settings that differ between cells; a group's own keys only where they differ
    between cells of the same option (stress.target_logit is logit_growth's, not a facet)."""
    leaves = [_leaves(c) for c in cells]
    keys = sorted({k for lv in leaves for k in lv})
    groups = {k for k in keys if any(k2.startswith(k + ".") for k2 in keys)}
    out = []
    for k in keys:
        head = k.split(".")[0]
        scope = head if head in groups and k != head else None
        seen: dict[object, set] = {}
        for lv in leaves:
            where = lv.get(scope) if scope else None
            seen.setdefault(repr(where), set()).add(repr(lv.get(k)))
        if any(len(v) > 1 for v in seen.values()):
            out.append(k)
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _state(c: Cell) -> tuple[str, str]:
    """(colour, label) of one cell."""
    n = c.n_seeds
    if n == 0:
        return "#eeeeee", "err" if c.n_error else "int"
    step = "" if c.median_bad_step is None else f" @{c.median_bad_step:g}"
    if c.outcome == TEST_FAILS:
        return STATE_COLORS[TEST_FAILS], f"test {c.n_test_nonfinite}/{c.n_test_run}"
    if c.state == "ok":
        return STATE_COLORS["ok"], f"{c.n_ok}/{n} ok"
    if c.state == "stalls":
        return STATE_COLORS["stalls"], f"{c.n_stalled}/{n} stall"
    if c.state == "fails":
        kind = "nonfinite" if c.n_nonfinite >= c.n_diverged else "diverged"
        return STATE_COLORS[kind], f"{c.n_failed}/{n}{step}"
    return STATE_COLORS["mixed"], f"{c.n_failed}/{n}{step}"


def draw_map(cells: list[Cell], path: str | os.PathLike, title: str | None = None):
    from matplotlib.patches import Patch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cells = [c for c in cells if c.n_seeds or c.n_error or c.n_interrupted]
    if not cells:
        return _empty(path, "no runs")
    axis = lr_axis(cells)
    fkeys = facet_keys(cells)
    leaves = {c.key: _leaves(c) for c in cells}
    mode = {
        k: Counter(repr(leaves[c.key].get(k)) for c in cells).most_common(1)[0][0] for k in fkeys
    }
    panels: dict[tuple, list[Cell]] = {}
    for c in cells:
        panels.setdefault(tuple(repr(leaves[c.key].get(k)) for k in fkeys), []).append(c)

    def n_off(f: tuple) -> int:
        return sum(v != mode[k] for k, v in zip(fkeys, f))

    order = sorted(
        panels,
        key=lambda f: (n_off(f) > 0, str(leaves[panels[f][0].key].get("stress")), n_off(f), f),
    )

    def x_of(c: Cell) -> float:  # the axis is lr_x only where every cell has one
        return c.lr_x if axis == "lr_x" else c.lr  # type: ignore[return-value]

    def title_of(f: tuple) -> str:
        lv = leaves[panels[f][0].key]
        parts = [
            f"{k}={_fmt(lv.get(k))}" for k, v in zip(fkeys, f) if v != mode[k] or k == "stress"
        ]
        lines, cur = [], ""
        for part in parts:
            if cur and len(cur) + len(part) > 34:
                lines.append(cur)
                cur = part
            else:
                cur = f"{cur}  {part}".strip()
        return "\n".join([*lines, cur]) if cur or lines else "(defaults)"

    rows_of = {
        f: sorted(
            {(c.precision, c.softmax) for c in panels[f]},
            key=lambda k: (_order(k[0], PRECISION_ORDER), _order(k[1], SOFTMAX_ORDER)),
        )
        for f in order
    }
    cols_of = {f: sorted({x_of(c) for c in panels[f]}) for f in order}
    # max_w: 14.3 in = 1,573 px at 110 dpi, read without scaling at the README's 1,600 px
    cw, rh, label_w, gap_w, max_w = 0.55, 0.26, 1.05, 0.3, 14.3
    titles = {f: title_of(f) for f in order}
    box_w = {
        f: label_w
        + max(
            len(cols_of[f]) * cw,
            0.058 * max(len(t) for t in titles[f].split("\n")) - label_w / 2,
            0.6,
        )
        + gap_w
        for f in order
    }
    grid: list[list] = [[]]  # flow layout: panels left to right, wrapped at max_w
    for f in order:
        if grid[-1] and sum(box_w[g] for g in grid[-1]) + box_w[f] > max_w:
            grid.append([])
        grid[-1].append(f)
    head_h = [0.16 * max(titles[f].count("\n") + 1 for f in g) + 0.12 for g in grid]
    row_h = [max(len(rows_of[f]) for f in g) * rh for g in grid]
    top, gap_h = 0.75, 0.4
    w = max(max(sum(box_w[f] for f in g) for g in grid) + 0.2, 6.0)
    bottom = 0.7 if w >= 9 else 0.9  # a narrow figure: the legend in two rows
    h = top + bottom + sum(row_h) + sum(head_h) + gap_h * (len(grid) - 1)
    fig = _figure(w, h)
    y = h - top
    for gi, g in enumerate(grid):
        y -= head_h[gi] + row_h[gi]
        x0 = 0.0
        for f in g:
            rk, xs = rows_of[f], cols_of[f]
            pw, ph = len(xs) * cw, len(rk) * rh
            ax = fig.add_axes(((x0 + label_w) / w, (y + row_h[gi] - ph) / h, pw / w, ph / h))
            x0 += box_w[f]
            ax.set_xlim(-0.5, len(xs) - 0.5)
            ax.set_ylim(len(rk) - 0.5, -0.5)
            look = {(c.precision, c.softmax, x_of(c)): c for c in panels[f]}
            for ri, (p, s) in enumerate(rk):
                for xi, x in enumerate(xs):
                    hit = look.get((p, s, x))
                    if hit is None:
                        continue
                    c = hit
                    color, label = _state(c)
                    ax.add_patch(_rect(xi, ri, color))
                    ax.text(
                        xi,
                        ri,
                        label,
                        ha="center",
                        va="center",
                        fontsize=5.8,
                        color="white" if _lum(color) < 0.5 else "black",
                    )
            ax.set_xticks(range(len(xs)))
            ax.set_xticklabels([fmt_lr(x) for x in xs], fontsize=6)
            ax.set_yticks(range(len(rk)))
            ax.set_yticklabels([f"{p} · {s}" for p, s in rk], fontsize=6)
            ax.tick_params(length=1.5, pad=1.5)
            ax.set_title(titles[f], fontsize=6.5, pad=3, fontweight="bold")
    fig.text(
        0.5,
        1 - 0.12 / h,
        title or "Appendix: every cell of the map",
        ha="center",
        va="top",
        fontsize=10,
        fontweight="bold",
    )
    fig.text(
        0.5,
        1 - 0.36 / h,
        f"{len(cells)} cells; columns {axis}; label: seeds failed "
        "k/n @ median first bad step (ok / stalled: seeds ok / stalled; test: seeds "
        "non-finite at test time / served)",
        ha="center",
        va="top",
        fontsize=7,
        color="#333333",
    )
    handles = [
        Patch(facecolor=STATE_COLORS[s], edgecolor="#707070", label=lab)
        for s, lab in (
            ("ok", "ok (>= 2/3 seeds)"),
            ("stalls", "finite, not trained"),
            (TEST_FAILS, TEST_FAILS_TEXT),
            ("nonfinite", "non-finite"),
            ("diverged", "diverged"),
            ("mixed", "mixed seeds"),
        )
    ]
    fig.legend(
        handles=handles,
        loc="lower center",
        ncol=6 if w >= 9 else 3,
        fontsize=7,
        frameon=False,
        bbox_to_anchor=(0.5, 0.01),
    )
    fig.savefig(path)
    return fig


def _rect(x: int, y: int, color: str):
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, facecolor=color, edgecolor="white", lw=0.8)
