"""The W&B sweep files against the NaN map, offline (no W&B service, no training).

* grid.yaml is what experiments/wandb/make_grid.py writes from the map's own sources now
  (a changed mechanism or map config without a regenerated grid fails here);
* its one parameter `cell` holds exactly the map's jobs; they compose with the map's settings
  and give the same config hash as the map's jobs, logged to W&B or not;
* the agent's command (wandb's own argument building) reaches the entry point through
  run_cell.py as the right Hydra call, for grid.yaml and bayes.yaml;
* launch.sh --dry-run sizes the sweeps (the grid: the map's cell count).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from experiments.wandb import make_grid, run_cell
from helpers import hydra_cfg, plain
from hydra_plugins.nanlab_sweeper.mechanism_sweeper import mechanism_cells, unique
from nanlab.config.compose import CONF_DIR, compose_spec, spec_from_config, validate_cli
from nanlab.sweep.progress import grid_size

ROOT = Path(__file__).resolve().parent.parent
WANDB_DIR = ROOT / "experiments" / "wandb"
ENTRY = ["/usr/bin/env", "python", "-m", "experiments.wandb.run_cell"]


def load(name: str) -> dict:
    return yaml.safe_load((WANDB_DIR / f"{name}.yaml").read_text())


def agent_command(sweep_command: list[str], params: dict) -> list[str]:
    """What `wandb agent` runs for one set of sweep parameters: wandb's own
    create_sweep_command / create_sweep_command_args, and the macro substitution of
    wandb_agent.Agent._command_run (inline there, so repeated here)."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    command = sweep_utils.create_sweep_command(list(sweep_command))
    sweep_vars = sweep_utils.create_sweep_command_args(
        {"args": {k: {"value": v} for k, v in params.items()}}
    )
    sweep_vars.update(interpreter=["python"], program=[None], env=["/usr/bin/env"])
    out: list[str] = []
    for c in map(str, command):
        if c.startswith("${") and c.endswith("}"):
            out += sweep_vars.get(c[2:-1]) or []
        else:
            out.append(c)
    return out


@pytest.fixture(scope="module")
def cells() -> list[str]:
    return load("grid")["parameters"]["cell"]["values"]


def sample(cells: list[str]) -> list[str]:
    """The first and the last cell of each block (the core grid, each mechanism)."""
    groups = [next((o for o in c.split() if o.startswith("stress=")), "core") for c in cells]
    return sorted(
        {
            c
            for i, c in enumerate(cells)
            if i in (0, len(cells) - 1) or groups[i] != groups[i - 1] or groups[i] != groups[i + 1]
        },
        key=cells.index,
    )


# --- grid.yaml is the map ---------------------------------------------------------------


def test_grid_yaml_is_what_make_grid_writes_now():
    text, n = make_grid.generate()
    assert (WANDB_DIR / "grid.yaml").read_text() == text, (
        "grid.yaml is stale: .venv/bin/python -m experiments.wandb.make_grid"
    )
    assert n == len(load("grid")["parameters"]["cell"]["values"])


def test_make_grid_check_and_write(tmp_path, capsys):
    assert make_grid.main(["--check"]) == 0
    out = tmp_path / "grid.yaml"
    out.write_text("method: grid\n")
    assert make_grid.main(["--check", "--out", str(out)]) == 1
    assert "make_grid" in capsys.readouterr().err
    assert make_grid.main(["--out", str(out)]) == 0
    assert out.read_text() == (WANDB_DIR / "grid.yaml").read_text()


def test_grid_sweeps_exactly_the_maps_cells(cells):
    sweep = load("grid")
    assert sweep["method"] == "grid" and list(sweep["parameters"]) == ["cell"]
    assert sweep["metric"]["name"].startswith("outcome/")
    assert cells == [" ".join(c) for c in make_grid.map_cells()]
    assert len(set(cells)) == len(cells)
    cfg = hydra_cfg("experiment=nan_map")
    assert grid_size(cfg) == len(cells)  # what `-m experiment=nan_map` runs
    sweeper = cfg.hydra.sweeper  # the union: the core product + mechanisms
    core = math.prod(len(str(v).split(",")) for v in sweeper.params.values())
    # the mechanisms' cells, less the controls that are core cells (run once, in the core)
    mechanisms = unique(
        [c.split() for c in cells[:core]] + mechanism_cells(sweeper.mechanisms, list(sweeper.seeds))
    )[core:]
    assert cells[core:] == [" ".join(c) for c in mechanisms]
    assert all("stress=" not in c for c in cells[:core])
    stresses = {p.stem for p in (CONF_DIR / "stress").glob("*.yaml")} - {"none"}
    assert {c.split()[0] for c in cells[core:]} == {f"stress={s}" for s in stresses | {"none"}}
    assert "PLACEHOLDER" not in (WANDB_DIR / "grid.yaml").read_text()


@pytest.mark.slow  # composes every cell of the map: a config check for CI
def test_cells_compose_with_the_maps_settings_and_hash(cells):
    """A sample of cells (each block's first and last, ~0.25 s a composition) composes as
    run_cell runs it for the agent (experiment=nan_map_base, W&B logger and all); the first
    of each block is also composed as the map's multirun has it (experiment=nan_map): the
    same config hash and cell, so W&B runs and the map's records line up."""
    command = load("grid")["command"][5:]  # after ${args_no_hyphens}
    firsts = {
        c
        for i, c in enumerate(cells)  # the core's first, each mechanism's first
        if i == 0 or (c.startswith("stress=") and c.split()[0] != cells[i - 1].split()[0])
    }
    for cell in sample(cells):
        overrides = run_cell.overrides([f"cell={cell}", *command])
        assert overrides[: len(cell.split()) + 1] == ["experiment=nan_map_base", *cell.split()]
        assert validate_cli(overrides) is None
        spec = compose_spec(*overrides)
        assert spec.logger.name == "wandb" and spec.optim.max_steps == 20, cell
        if cell in firsts:
            in_map = compose_spec("experiment=nan_map", *cell.split())
            assert (spec.config_hash, spec.cell) == (in_map.config_hash, in_map.cell), cell
            assert in_map.logger.name == "csv"
    # every mechanism's block is sampled (its controls, stress=none, are blocks of their own)
    assert {c.split()[0] for c in firsts if c.startswith("stress=")} == {
        c.split()[0] for c in cells if c.startswith("stress=")
    }


# --- run_cell: the agent's arguments -> the entry point's -------------------------------


@pytest.mark.parametrize("args", [["--cell=a=1 b=2"], ["cell=a=1 b=2"], ["--cell", "a=1  b=2"]])
def test_run_cell_splits_the_cell(args):
    assert run_cell.argv(args, python="py") == [
        "py",
        "-m",
        "src.train",
        "experiment=nan_map_base",
        "a=1",
        "b=2",
    ]


def test_run_cell_passes_the_rest_and_the_cell_wins_a_key():
    args = ["lr_x=0.5", "cell=seed=1 lr_x=3", "logger=wandb", "hydra.run.dir='x/${now:%H}'"]
    assert run_cell.argv(args, python="py") == [
        "py",
        "-m",
        "src.train",
        "experiment=nan_map_base",
        "seed=1",
        "lr_x=3",
        "logger=wandb",
        "hydra.run.dir='x/${now:%H}'",
    ]
    assert run_cell.argv([], python="py") == ["py", "-m", "src.train", "experiment=nan_map_base"]


def test_run_cell_execs_the_entry_point(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(os, "execv", lambda path, argv: calls.append((path, argv)))
    run_cell.main(["--cell=precision=bf16 seed=0", "logger=wandb"])
    assert calls == [
        (
            sys.executable,
            [
                sys.executable,
                "-m",
                "src.train",
                "experiment=nan_map_base",
                "precision=bf16",
                "seed=0",
                "logger=wandb",
            ],
        )
    ]
    assert "experiment=nan_map_base precision=bf16" in capsys.readouterr().err


# --- the agent's command, through run_cell, as Hydra sees it ----------------------------


def bayes_params(sweep: dict) -> list[dict]:
    p = sweep["parameters"]["lr_x"]
    lo, hi = float(p["min"]), float(p["max"])
    return [
        {"cell": sweep["parameters"]["cell"]["value"], "lr_x": x}
        for x in (lo, math.sqrt(lo * hi) * 1.2345678, hi)
    ]


@pytest.mark.parametrize("name", ["grid", "bayes"])
def test_agent_command_is_the_maps_hydra_call(name, cells, monkeypatch):
    sweep = load(name)
    assert sweep["command"] == make_grid.COMMAND  # one command for both sweep files
    if name == "grid":
        params = [{"cell": c} for c in (cells[0], cells[-1])]
    else:
        assert sweep["method"] == "bayes" and set(sweep["parameters"]) == {"cell", "lr_x"}
        assert sweep["parameters"]["lr_x"]["distribution"] == "log_uniform_values"
        assert "lr_x" not in sweep["parameters"]["cell"]["value"]
        assert sweep["metric"]["name"].startswith("outcome/")
        params = bayes_params(sweep)
    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep123")
    monkeypatch.setenv("WANDB_RUN_ID", "run456")
    for p in params:
        argv = agent_command(sweep["command"], p)
        assert argv[:4] == ENTRY, argv
        assert f"cell={p['cell']}" in argv  # one argument, spaces and all
        overrides = run_cell.overrides(argv[4:])
        assert validate_cli(overrides) is None
        cfg = hydra_cfg(*overrides)  # Hydra parses every override (RUN mode: no sweeps)
        assert cfg.hydra.run.dir == "outputs/wandb_sweeps/sweep123/run456"
        spec = spec_from_config(plain(cfg), overrides)
        assert spec.logger.name == "wandb" and spec.logger.mode == "online"
        assert spec.optim.max_steps == 20 and spec.data.num_train == 128  # nan_map_base
        if "lr_x" in p:
            assert math.isclose(spec.optim.lr, p["lr_x"] * spec.model.ref_lr)
            assert (spec.precision.name, spec.softmax.name) == ("bf16", "sdpa")


def test_run_dir_is_unique_without_an_agent(monkeypatch, cells):
    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    argv = agent_command(load("grid")["command"], {"cell": cells[0]})
    run_dir = hydra_cfg(*run_cell.overrides(argv[4:])).hydra.run.dir
    assert re.fullmatch(r"outputs/wandb_sweeps/nosweep/[\d_-]+_\d{6}", run_dir), run_dir


# --- launch.sh --------------------------------------------------------------------------


def launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(WANDB_DIR / "launch.sh"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
        timeout=120,
        env=dict(os.environ, PATH=f"{Path(sys.executable).parent}:" + os.environ["PATH"]),
    )


def test_launch_dry_run_sizes_the_sweeps(cells):
    for script in ("launch.sh", "agent.sbatch"):
        assert subprocess.run(["bash", "-n", str(WANDB_DIR / script)], check=False).returncode == 0
    grid = launch("grid", "--slurm", "--dry-run", "--parallel", "4")
    assert grid.returncode == 0, grid.stderr
    assert f"runs: {len(cells)}\n" in grid.stderr
    assert f"sbatch --array=0-{len(cells) - 1}%4 experiments/wandb/agent.sbatch" in grid.stderr
    bayes = launch("bayes", "--dry-run", "--count", "5")
    assert bayes.returncode == 0, bayes.stderr
    assert f"runs: {load('bayes')['run_cap']}\n" in bayes.stderr
    assert "wandb agent --count 5 ENTITY/PROJECT/SWEEP_ID" in bayes.stderr


def test_wandb_run_has_the_cell_and_the_config(tmp_path, monkeypatch, capsys, cells):
    """What an agent's child does, offline and without training: the env the agent sets
    (sweep id, run id, parameter file with `cell`) makes train.py's WandbLogger join that
    run; its config has the sweep's `cell` beside the composed config (precision, stress,
    lr_x, ... for the dashboard's views); the outcome goes into its summary."""
    import wandb

    from nanlab.record import Record
    from nanlab.run.runner import _finish_logger, _logger

    cell = next(c for c in cells if c.startswith("stress="))
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump({"wandb_version": 1, "cell": {"value": cell}})
    )
    run_id = "nl" + os.urandom(3).hex()
    for key, value in {
        "WANDB_SWEEP_ID": "sweeptest",
        "WANDB_RUN_ID": run_id,
        "WANDB_SWEEP_PARAM_PATH": str(tmp_path / "params.yaml"),
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(tmp_path),
    }.items():
        monkeypatch.setenv(key, value)
    argv = agent_command(load("grid")["command"], {"cell": cell})
    overrides = [
        "logger.mode=offline" if o == "logger.mode=online" else o
        for o in run_cell.overrides(argv[4:])
    ]
    cfg = hydra_cfg(*overrides)
    run_dir = tmp_path / Path(cfg.hydra.run.dir).relative_to("outputs")
    spec = spec_from_config(plain(cfg), overrides)
    try:
        logger = _logger(spec, run_dir)
        run = logger.experiment
        assert (run.id, run.sweep_id) == (run_id, "sweeptest")
        assert run.config["cell"] == cell
        assert run.config["stress"]["name"] == cell.split()[0].split("=")[1]
        assert run.config["max_steps"] == 20
        _finish_logger(logger, Record(status="nonfinite", lr=0.3, first_bad_step=3))
    finally:
        wandb.teardown()
    assert "could not finish the logger" not in capsys.readouterr().err
    assert next((run_dir / "wandb").glob("offline-run-*")).name.endswith(run_id)
