"""Sweeps: Hydra launchers, the named grids, skipping done cells, the progress callback, and
the W&B sweep files (the command an agent would run, checked against Hydra offline).

The end-to-end tests run the real CLI on a few cells of two steps each."""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import open_dict

from helpers import hydra_cfg, plain
from nanlab.config.compose import CONF_DIR, spec_from_config, validate_cli
from nanlab.record import read_record
from nanlab.report import collect
from nanlab.sweep.progress import SweepProgress, grid_size, progress_line

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "max_steps=2",
    "data.num_train=8",
    "data.num_val=4",
    "data.num_test=4",
    "logger=csv",
    "trainer.progress=false",
]


def cli(*args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "src.train", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def records(root: Path) -> dict[str, object]:
    """run dir name -> Record"""
    return {p.parent.name: read_record(p) for p in sorted(root.rglob("record.json"))}


# --- launchers --------------------------------------------------------------------------


# the SLURM launcher configs' sbatch flags: tests/test_slurm.py


@pytest.mark.parametrize(
    "launcher,target",
    [(None, "BasicLauncher"), ("joblib", "JoblibLauncher"), ("submitit_local", "LocalLauncher")],
)
def test_launchers_compose(launcher, target):
    overrides = [f"hydra/launcher={launcher}"] if launcher else []
    if launcher == "joblib":
        overrides.append("hydra.launcher.n_jobs=2")
    cfg = hydra_cfg(*overrides)
    assert cfg.hydra.launcher._target_.endswith(target)
    assert cfg.hydra.callbacks.sweep_progress._target_ == "nanlab.sweep.progress.SweepProgress"
    if launcher == "joblib":
        assert cfg.hydra.launcher.n_jobs == 2


# --- the named grids --------------------------------------------------------------------


GRIDS = sorted(
    p.stem for p in (CONF_DIR / "experiment").glob("*.yaml") if "sweeper:" in p.read_text()
)


def test_the_named_grids_exist():
    assert {"nan_map", "nan_map_smoke"} <= set(GRIDS)


@pytest.mark.parametrize("name", GRIDS)
def test_experiment_grid_values_all_compose(name):
    cfg = hydra_cfg(f"experiment={name}")
    assert cfg.hydra.sweep.dir.startswith("outputs/sweeps/"), cfg.hydra.sweep.dir
    assert cfg.trainer.progress is False  # the sweep callback shows progress
    params = {k: str(v).split(",") for k, v in (cfg.hydra.sweeper.params or {}).items()}
    target = str(cfg.hydra.sweeper.get("_target_", ""))
    if target.endswith("MechanismSweeper"):  # the map: the core grid + the mechanisms' cells
        from hydra_plugins.nanlab_sweeper.mechanism_sweeper import mechanism_cells

        sweeper = cfg.hydra.sweeper
        cells = (
            []
            if sweeper.mechanisms == "none"
            else mechanism_cells(sweeper.mechanisms, sweeper.seeds)
        )
        arms = len(sweeper.get("arms") or [[]])
        grid = math.prod(len(v) for v in params.values()) * arms
        # a control that is a core-grid cell (stress=none, the same settings) runs once
        in_grid = sum(
            1
            for c in cells
            if "stress=none" in c
            and sweeper.mechanisms
            and set(c) - {"stress=none"} <= {f"{k}={v}" for k, vs in params.items() for v in vs}
        )
        assert grid_size(cfg) == grid + len(cells) - in_grid
    elif "BasicSweeper" in target:
        assert grid_size(cfg) == math.prod(len(v) for v in params.values())
    else:  # adaptive (bisection): no total to show
        assert grid_size(cfg) is None
    # every value of every axis composes and passes the specs' checks, and is a run of its
    # own: a shared config hash would make the sweep skip one value as the other's record
    for key, values in params.items():
        hashes = set()
        for value in values:
            override = f"{key}={value}"
            assert validate_cli([override]) is None, override
            spec = spec_from_config(plain(hydra_cfg(f"experiment={name}", override)))
            hashes.add(spec.config_hash)
        assert len(hashes) == len(values), (key, values)


def test_smoke_grid_settings():
    cfg = hydra_cfg("experiment=nan_map_smoke")
    assert cfg.hydra.sweep.dir == "outputs/sweeps/nan_map_smoke"
    assert cfg.max_steps == 6 and cfg.monitor.every == 2 and cfg.data.num_train == 32
    assert cfg.logger.name == "csv"
    assert grid_size(cfg) == 8


def test_grid_size_counts_command_line_axes():
    # a command-line value replaces that axis of the grid; a command-line sweep multiplies
    cfg = hydra_cfg("experiment=nan_map_smoke")
    with open_dict(cfg):  # what a multirun's command line leaves in hydra.overrides.task
        cfg.hydra.overrides.task = ["experiment=nan_map_smoke", "lr=1e-3", "seed=0,1,2"]
    assert grid_size(cfg) == 2 * 2 * 1 * 3


# --- the progress callback --------------------------------------------------------------


def _job_return(status: str | None, failed: bool = False) -> JobReturn:
    return JobReturn(
        status=JobStatus.FAILED if failed else JobStatus.COMPLETED,
        _return_value=RuntimeError("boom") if failed else status,
    )


def _as_job(cfg, num: int, out: Path):
    job = cfg.copy()
    with open_dict(job):
        job.hydra.job.num = num
        job.hydra.runtime.output_dir = str(out / str(num))
    return job


def test_progress_callback_counts_across_processes(tmp_path, capsys):
    cfg = hydra_cfg("experiment=nan_map_smoke", f"hydra.sweep.dir={tmp_path}")
    with open_dict(cfg):
        cfg.hydra.mode = "MULTIRUN"
    cb = SweepProgress()
    cb.on_multirun_start(cfg)
    assert "8 cells" in capsys.readouterr().out

    cb.on_job_start(cfg)
    cb.on_job_end(_as_job(cfg, 0, tmp_path), _job_return("ok"))
    # a joblib / submitit worker: a pickled copy of the callback, in "another process"
    worker = pickle.loads(pickle.dumps(cb))
    worker.seen.clear()
    worker.on_job_end(_as_job(cfg, 1, tmp_path), _job_return("skipped"))
    # no return value: the record in the job's output dir says what happened
    (tmp_path / "2").mkdir()
    (tmp_path / "2" / "record.json").write_text(json.dumps({"status": "nonfinite"}))
    worker.on_job_end(_as_job(cfg, 2, tmp_path), _job_return(None))
    worker.on_job_end(_as_job(cfg, 3, tmp_path), _job_return(None, failed=True))
    out = capsys.readouterr().out
    assert "sweep 4/8 (50%)" in out
    assert re.search(
        r"ok 1 · stalled 0 · nonfinite 1 · diverged 0 · interrupted 0 · error 1 · "
        r"skipped 1",
        out,
    ), out

    cb.on_multirun_end(cfg)  # the submitting process sees the workers' cells too
    out = capsys.readouterr().out
    assert "sweep done" in out and "4/8 cells" in out and "python -m src.report" in out
    assert not (tmp_path / ".progress").exists()


def test_progress_callback_polls_submitit_cells_from_the_submitting_process(tmp_path, capsys):
    cfg = hydra_cfg(
        "hydra/launcher=submitit_local", "experiment=nan_map_smoke", f"hydra.sweep.dir={tmp_path}"
    )
    with open_dict(cfg):
        cfg.hydra.mode = "MULTIRUN"
    cb = SweepProgress(poll_s=0.05)
    cb.on_multirun_start(cfg)
    assert cb._stop is not None  # the poller runs here...
    job = pickle.loads(pickle.dumps(cb))  # ...and is not pickled into the jobs
    assert job._stop is None
    job.on_job_start(cfg)
    job.on_job_end(_as_job(cfg, 5, tmp_path), _job_return("diverged"))
    # the job prints "cell #5 ... │ sweep 1/8 ..." (into its log on SLURM); the poller here
    # prints a line of its own, "sweep 1/8 ..."
    polled = re.compile(r"^sweep 1/8 .*diverged 1", re.MULTILINE)
    out, deadline = "", time.time() + 10
    while not polled.search(out) and time.time() < deadline:
        time.sleep(0.05)
        out += capsys.readouterr().out
    assert polled.search(out), out
    cb.on_multirun_end(cfg)
    assert cb._stop.is_set()


def test_progress_callback_is_quiet_in_single_runs_and_never_raises(tmp_path, capsys):
    cfg = hydra_cfg(f"hydra.run.dir={tmp_path}")
    cb = SweepProgress()
    capsys.readouterr()
    cb.on_job_end(cfg, _job_return("ok"))  # RUN mode: nothing
    assert capsys.readouterr() == ("", "")
    with open_dict(cfg):
        cfg.hydra.mode = "MULTIRUN"
    # no on_multirun_start, an odd job return, no job number, no output dir: still a line
    # (an error cell, number 0, no total), and not a swallowed exception's warning
    cb.on_job_end(cfg, object())
    out, err = capsys.readouterr()
    assert out.startswith("cell #0 error (?) │ sweep 1 │ ok 0 ·") and "error 1" in out, out
    assert err == "", err


def test_progress_line_estimates_time_left():
    line = progress_line(2, 8, {"ok": 1, "skipped": 1}, 30.0, 180.0, markup=False)
    assert line.startswith("sweep 2/8 (25%)") and "30s elapsed, ~3m00s left" in line


# --- end to end: the real CLI -----------------------------------------------------------


@pytest.fixture(scope="module")
def basic_sweep(tmp_path_factory):
    """The README's sweep with a bad cell in the middle: one process, three cells."""
    out = tmp_path_factory.mktemp("basic_sweep")
    started = time.time()
    proc = ok(
        cli(
            "precision=bf16",
            "softmax=stable",
            "-m",
            "lr=1e-5,-1,5e-5",
            *TINY,
            f"hydra.sweep.dir={out}",
        )
    )
    print(f"basic launcher, 3 cells: {time.time() - started:.1f} s")
    return out, proc


@pytest.mark.slow
def test_multirun_basic_launcher_leaves_one_record_per_cell(basic_sweep):
    out, proc = basic_sweep
    df = collect(out)
    assert sorted(df["lr"]) == [-1, 1e-5, 5e-5]
    assert set(df["precision"]) == {"bf16"} and set(df["softmax"]) == {"stable"}
    # two steps at these lrs barely move the weights: finite, but the loss does not fall the
    # 10% an `ok` needs
    assert list(df.sort_values("lr")["status"]) == ["error", "stalled", "stalled"]
    assert "sweep 3/3 (100%)" in proc.stdout and "sweep done" in proc.stdout


@pytest.mark.slow
def test_multirun_bad_cell_is_an_error_record_and_the_sweep_goes_on(basic_sweep):
    out, proc = basic_sweep
    recs = {r.lr: r for r in records(out).values()}
    assert set(recs) == {1e-5, -1.0, 5e-5}  # the cell after the bad one ran too
    assert recs[-1.0].status == "error" and "lr=-1" in recs[-1.0].error
    assert recs[-1.0].precision == "bf16" and recs[-1.0].softmax == "stable"
    # the progress line after the last cell counts the error and both good cells
    assert (
        "sweep 3/3 (100%) │ ok 0 · stalled 2 · nonfinite 0 · diverged 0 · interrupted 0 · "
        "error 1 · skipped 0"
    ) in proc.stdout, proc.stdout[-3000:]


@pytest.mark.slow
def test_multirun_submitit_local_leaves_one_record_per_cell(tmp_path):
    ok(
        cli(
            "hydra/launcher=submitit_local",
            "precision=bf16",
            "softmax=stable",
            "-m",
            "lr=1e-5,5e-5",
            *TINY,
            f"hydra.sweep.dir={tmp_path}",
        )
    )
    df = collect(tmp_path)
    assert sorted(df["lr"]) == [1e-5, 5e-5]
    assert list(df["status"]) == ["stalled", "stalled"]  # as with the basic launcher
    assert list(tmp_path.glob(".submitit/*/*_log.out")), "submitit ran the jobs"


@pytest.mark.slow
def test_rerun_skips_done_cells_and_force_reruns(tmp_path):
    # the smoke grid with the precision and softmax axes pinned: two cells (lr 1e-3, 0.3)
    args = [
        "-m",
        "experiment=nan_map_smoke",
        "precision=fp32",
        "softmax=stable",
        "max_steps=2",
        "data.num_train=8",
        f"hydra.sweep.dir={tmp_path}",
    ]
    ok(cli(*args))
    first = records(tmp_path)
    assert sorted(r.lr for r in first.values()) == [1e-3, 0.3]
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("record.json")}

    started = time.time()
    again = ok(cli(*args))
    print(f"re-run with every cell done: {time.time() - started:.1f} s")
    assert len(re.findall(r"cell #\d+ skipped", again.stdout)) == 2, again.stdout
    assert "Trainer.fit" not in again.stdout + again.stderr
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("record.json")} == mtimes
    assert "skipped 2" in again.stdout

    forced = ok(cli(*args[:-1], "lr=1e-3", "force=true", f"hydra.sweep.dir={tmp_path}"))
    assert "skip:" not in forced.stdout
    changed = [p for p, t in mtimes.items() if p.stat().st_mtime_ns != t]
    assert [read_record(p).lr for p in changed] == [1e-3]
    assert len(collect(tmp_path)) == 2
