"""The map's sweeper: the mechanisms' cells from their YAMLs, plus an ordinary grid.

Hydra's basic sweeper takes products of axes; the map is a union: for each mechanism
(conf/stress/<name>.yaml) its baseline, one cell per prediction (the baseline with the
mitigation's overrides) and its control (the baseline with the trigger removed), times the
seeds; plus the `params` grid (the core of the
stable-lr frontier), as the basic sweeper expands it. Every cell is an ordinary job of the
same entry point through whatever launcher is configured (joblib, submitit, SLURM), so the
records and the report do not know which sweeper made them. Hydra plugins must live under
`hydra_plugins`; this one only reads YAML (no torch).
"""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

# The subclass imports its base from Hydra itself: Hydra's plugin scan re-imports its core
# plugins' modules, and BasicSweeper.__init__ calls super(BasicSweeper, self) with the fresh
# class, so a base class held by another module (nanlab.sweep.basic) would be a stale copy.
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

from nanlab.sweep.basic import split_arguments

log = logging.getLogger(__name__)
CONF = Path(__file__).resolve().parents[2] / "conf"


def mechanism_cells(mechanisms=None, seeds=(0, 1, 2), conf: Path = CONF) -> list[list[str]]:
    """For each mechanism: [stress=M, *baseline] and [stress=M, *baseline + mitigation] per
    prediction, each seed. A mitigation's override replaces the baseline's for that key."""
    names = sorted(p.stem for p in (conf / "stress").glob("*.yaml") if p.stem != "none")
    chosen = names if not mechanisms or mechanisms == "all" else list(mechanisms)
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        raise ValueError(f"hydra.sweeper.mechanisms={unknown[0]}: allowed {', '.join(names)}")
    cells = []
    for name in chosen:
        spec = yaml.safe_load((conf / "stress" / f"{name}.yaml").read_text())
        arms = [[]] + [list(p["mitigation"]) for p in spec.get("predictions") or []]
        # the control: the baseline with the trigger removed (`control:`, e.g. stress=none)
        arms += [list(spec["control"])] if spec.get("control") else []
        for arm in arms:
            merged = merge_overrides([f"stress={name}", *spec.get("baseline", [])], arm)
            cells += [[*merged, f"seed={s}"] for s in seeds]
    return cells


def cell_key(job: list[str]) -> tuple[str, ...]:
    """Jobs that compose the same config: the same overrides in any order, `stress=none`
    (the default) left out. A control such as `stress=none precision=bf16 softmax=naive
    lr_x=1` is also a core-grid cell; the map runs it once."""
    return tuple(sorted(o for o in job if o != "stress=none"))


def unique(jobs: list[list[str]]) -> list[list[str]]:
    seen: set[tuple[str, ...]] = set()
    out = []
    for job in jobs:
        if cell_key(job) not in seen:
            seen.add(cell_key(job))
            out.append(job)
    return out


def merge_overrides(base: list[str], extra: list[str]) -> list[str]:
    """Overrides with later keys replacing earlier ones (Hydra refuses duplicate keys)."""
    out: dict[str, str] = {}
    for o in [*base, *extra]:
        out[o.split("=", 1)[0]] = o
    return list(out.values())


class MechanismSweeper(BasicSweeper):
    """`params`: a grid as the basic sweeper expands it, crossed with `arms` (lists of
    overrides, e.g. one per mitigation; none: the grid alone); plus the mechanisms' cells
    (`mechanisms`: all, a list of names, or none)."""

    def __init__(
        self, max_batch_size=None, params=None, mechanisms=None, seeds=(0, 1, 2), arms=None
    ):
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.mechanisms = mechanisms
        self.seeds = list(seeds)
        self.arms = [list(a) for a in arms] if arms else [[]]

    def split_arguments(self, overrides, max_batch_size):
        grid = (
            []
            if not self.params
            else [
                merge_overrides(list(job), arm)
                for arm in self.arms
                for batch in split_arguments(overrides)
                for job in batch
            ]
        )
        # command-line values that are not sweeps apply to the mechanism cells too
        fixed = [
            o.input_line
            for o in overrides
            if not o.is_sweep_override() and o.input_line is not None
        ]
        cells = (
            []
            if self.mechanisms == "none"
            else [
                merge_overrides(fixed, cell)
                for cell in mechanism_cells(self.mechanisms, self.seeds)
            ]
        )
        jobs = unique(grid + cells)
        # the sweep progress line counts them too (it calls this once more): debug only
        log.debug(f"map: {len(grid)} grid cells + {len(cells)} mechanism cells")
        size = max_batch_size or len(jobs)
        return [jobs[i : i + size] for i in range(0, len(jobs), size)]
