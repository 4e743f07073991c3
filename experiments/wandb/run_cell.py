"""One W&B sweep run: a map cell, run with the map's settings.

The sweep files' command is `python -m experiments.wandb.run_cell ${args_no_hyphens} ...`;
the agent passes the `cell` parameter as ONE argument, `cell=stress=masked_rows
precision=bf16 ...` (or `--cell=...` with ${args}). This splits it into Hydra overrides and
replaces itself (exec, so the agent's signals reach training) with

    python -m src.train experiment=nan_map_base <cell overrides> <the other arguments>

Other arguments (other sweep parameters such as lr_x, logger=wandb, hydra.run.dir=...) pass
through; where one sets a key the cell sets too, the cell wins, as in the map's sweeper.
By hand, to rerun a W&B run's cell locally (CSV logger, outputs/runs/...):

    python -m experiments.wandb.run_cell cell="stress=masked_rows precision=bf16 ..."
"""

from __future__ import annotations

import os
import sys

BASE = "experiment=nan_map_base"  # the settings every job of the map runs with
ENTRY = ["-m", "src.train"]


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """(the cell's overrides, the other arguments): `cell=V`, `--cell=V` or `--cell V`."""
    cell: list[str] = []
    rest: list[str] = []
    it = iter(args)
    for arg in it:
        if arg.startswith(("cell=", "--cell=")):
            cell += arg.split("=", 1)[1].split()
        elif arg == "--cell":
            cell += next(it, "").split()
        else:
            rest.append(arg)
    return cell, rest


def overrides(args: list[str]) -> list[str]:
    """The entry point's overrides: experiment=nan_map_base, the cell's, the rest; one per
    key (Hydra refuses duplicates), the cell over the rest over the base."""
    cell, rest = split_args(args)
    chosen = {_key(o): o for o in [BASE, *rest, *cell]}  # a later one wins its key
    out: list[str] = []
    for o in [BASE, *cell, *rest]:  # the cell's first, for the eye
        if _key(o) in chosen:
            out.append(chosen.pop(_key(o)))
    return out


def argv(args: list[str], python: str | None = None) -> list[str]:
    """The full command this wrapper runs for its own arguments `args`."""
    return [python or sys.executable, *ENTRY, *overrides(args)]


def main(args: list[str] | None = None) -> None:
    cmd = argv(sys.argv[1:] if args is None else args)
    print("run_cell:", " ".join(cmd[1:]), file=sys.stderr, flush=True)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
