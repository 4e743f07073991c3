"""Write experiments/wandb/grid.yaml: the default NaN map's cells as one W&B grid parameter.

W&B grid sweeps take products of parameters; the map (conf/experiment/nan_map.yaml) is a
union: the `params` core grid plus, for every mechanism, its baseline and one cell per
prediction, times the seeds (hydra_plugins/nanlab_sweeper). So the sweep has one parameter,
`cell`, whose values are the map's jobs in the map's order, each its Hydra overrides joined
by spaces; the sweep's command (experiments/wandb/run_cell.py) runs
`python -m src.train experiment=nan_map_base <cell> ...`, the settings every map job has.

    python -m experiments.wandb.make_grid            # rewrite grid.yaml
    python -m experiments.wandb.make_grid --check    # exit 1 if grid.yaml is not up to date

The cells come from the map's own sources: Hydra composes `experiment=nan_map` (its
hydra.sweeper node: params, mechanisms, seeds) and the configured sweeper expands them, as
in the map's multirun. Only YAML and Hydra here, no torch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

import nanlab.config.compose  # noqa: F401  (registers the config schemas conf/config.yaml starts from)

ROOT = Path(__file__).resolve().parents[2]
GRID = Path(__file__).with_name("grid.yaml")
EXPERIMENT = "nan_map"  # the map whose cells the grid sweeps

# The command of both sweep files: the agent puts the parameters where ${args_no_hyphens}
# is (cell="...", as one argument), run_cell splits the cell into overrides.
COMMAND = [
    "${env}",
    "${interpreter}",
    "-m",
    "experiments.wandb.run_cell",
    "${args_no_hyphens}",
    "logger=wandb",
    "logger.mode=online",
    "trainer.progress=false",
    (
        "hydra.run.dir='outputs/wandb_sweeps/${oc.env:WANDB_SWEEP_ID,nosweep}/"
        "${oc.env:WANDB_RUN_ID,${now:%Y-%m-%d_%H-%M-%S_%f}}'"
    ),
]

HEADER = """\
# W&B grid sweep over the default NaN map's cells: GENERATED, do not edit by hand. After a
# change to conf/experiment/nan_map.yaml or a mechanism (conf/stress/*.yaml):
#   .venv/bin/python -m experiments.wandb.make_grid       # rewrites this file
# The map is a union (a core grid plus each mechanism's baseline and predicted fixes, times
# seeds), which a W&B grid cannot express as a product: the one parameter `cell` holds each of
# the map's jobs, its Hydra overrides joined by spaces. Every run is one call of the entry
# point with the map's settings:
#   python -m src.train experiment=nan_map_base <cell> logger=wandb ...   (run_cell.py)
#   bash experiments/wandb/launch.sh grid              # create the sweep, run one agent here
#   bash experiments/wandb/launch.sh grid --slurm      # one SLURM array task per run
# Needs the W&B service (online). Without network use the Hydra route (make sweep) and
# `wandb sync` the offline runs afterwards.
"""

BODY_HEAD = """\
project: nanlab
method: grid
metric:
  name: outcome/final_loss          # from Record.summary(); a grid does not use it to search
  goal: minimize
parameters:
  cell:                             # one of the map's jobs: Hydra overrides, space-separated
    values:
"""

COMMAND_COMMENTS = {
    "logger.mode=online": "the run must reach the sweep; offline runs never report",
}
RUN_DIR_COMMENT = """\
  # one run dir per agent run: the agent exports WANDB_SWEEP_ID and WANDB_RUN_ID to the child;
  # quoted, or Hydra's override grammar rejects the nested interpolation
"""


def sweeper_config(experiment: str = EXPERIMENT) -> dict:
    """The map's hydra.sweeper node, composed as the multirun composes it."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="config", overrides=[f"experiment={experiment}"], return_hydra_config=True
        )
    return OmegaConf.to_container(cfg.hydra.sweeper, resolve=True)


def map_cells(experiment: str = EXPERIMENT, sweeper: dict | None = None) -> list[list[str]]:
    """The map's jobs (each a list of Hydra overrides), expanded by its configured sweeper
    from hydra.sweeper.params / mechanisms / seeds, in the order the multirun runs them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.utils import get_class

    if str(ROOT) not in sys.path:  # hydra_plugins, from any directory
        sys.path.insert(0, str(ROOT))
    kwargs = dict(sweeper or sweeper_config(experiment))
    cls = get_class(kwargs.pop("_target_"))
    params = kwargs.get("params") or {}
    overrides = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    return [list(job) for batch in cls(**kwargs).split_arguments(overrides, None) for job in batch]


def cell_value(overrides: list[str]) -> str:
    """One cell as the W&B parameter value; run_cell splits it on whitespace again."""
    for o in overrides:
        if not o or any(c.isspace() for c in o):
            raise ValueError(f"override {o!r}: a cell's overrides cannot hold whitespace")
    return " ".join(overrides)


def _group(overrides: list[str]) -> str:
    return next((o for o in overrides if o.startswith("stress=")), "core")


def render(cells: list[list[str]], core_axes: list[str] | tuple = ()) -> str:
    """grid.yaml's text: the header, the `cell` values (a comment before each block: the
    core grid, then each mechanism), the command."""
    values = [cell_value(c) for c in cells]
    groups = [_group(c) for c in cells]
    lines = [HEADER, BODY_HEAD]
    for i, (value, group) in enumerate(zip(values, groups)):
        if i == 0 or group != groups[i - 1]:
            what = (
                f"the core grid: {' x '.join(core_axes) or 'hydra.sweeper.params'}"
                if group == "core"
                else f"{group}: baseline and predicted fixes x seeds"
            )
            lines.append(f"      # {what} ({_run_length(groups, i)} cells)\n")
        lines.append("      " + yaml.safe_dump([value], width=10**9))
    lines.append("command:\n")
    for item in COMMAND:
        if item.startswith("hydra.run.dir="):
            lines.append(RUN_DIR_COMMENT)
        line = "  " + yaml.safe_dump([item], width=10**9).rstrip("\n")
        comment = COMMAND_COMMENTS.get(item)
        lines.append(f"{line:<36}# {comment}\n" if comment else line + "\n")
    text = "".join(lines)
    sweep = yaml.safe_load(text)  # the text says what it should
    assert sweep["parameters"]["cell"]["values"] == values and sweep["command"] == COMMAND
    return text


def generate(experiment: str = EXPERIMENT) -> tuple[str, int]:
    """(grid.yaml's text, number of cells) for the map as it is configured now."""
    sweeper = sweeper_config(experiment)
    cells = map_cells(sweeper=sweeper)
    return render(cells, list(sweeper.get("params") or {})), len(cells)


def _run_length(groups: list[str], start: int) -> int:
    n = 0
    while start + n < len(groups) and groups[start + n] == groups[start]:
        n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.wandb.make_grid", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if the file differs from what it would be",
    )
    parser.add_argument("--out", type=Path, default=GRID, help=f"default: {GRID}")
    args = parser.parse_args(argv)
    text, n = generate()
    if args.check:
        if args.out.exists() and args.out.read_text() == text:
            print(f"{args.out}: up to date ({n} cells)")
            return 0
        print(
            f"{args.out}: out of date with the map ({n} cells); regenerate it: "
            f".venv/bin/python -m experiments.wandb.make_grid",
            file=sys.stderr,
        )
        return 1
    args.out.write_text(text)
    print(f"{args.out}: {n} cells")
    return 0


if __name__ == "__main__":
    sys.exit(main())
