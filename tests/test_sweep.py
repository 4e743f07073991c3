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
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf, open_dict

from src.record import read_record
from src.report import collect
from src.sweep import SweepProgress, grid_size, progress_line
from src.train import CONF_DIR, spec_from_config, validate_cli

ROOT = Path(__file__).resolve().parent.parent
WANDB_DIR = ROOT / "experiments" / "wandb"
TINY = ["max_steps=2", "data.num_train=8", "data.num_val=4", "data.num_test=4", "logger=csv",
        "trainer.progress=false"]


def cli(*args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "src.train", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def hydra_cfg(*overrides: str):
    """The composed config with its `hydra` node, as a multirun would see it."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def plain(cfg) -> dict:
    """The resolved job config without the hydra node, as src.train.hydra_job sees it."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return OmegaConf.to_container(cfg, resolve=True)


def records(root: Path) -> dict[str, object]:
    """run dir name -> Record"""
    return {p.parent.name: read_record(p) for p in sorted(root.rglob("record.json"))}


# --- launchers --------------------------------------------------------------------------


# the SLURM launcher configs' sbatch flags: tests/test_slurm.py


@pytest.mark.parametrize("launcher,target", [
    (None, "BasicLauncher"), ("joblib", "JoblibLauncher"), ("submitit_local", "LocalLauncher")])
def test_launchers_compose(launcher, target):
    overrides = [f"hydra/launcher={launcher}"] if launcher else []
    if launcher == "joblib":
        overrides.append("hydra.launcher.n_jobs=2")
    cfg = hydra_cfg(*overrides)
    assert cfg.hydra.launcher._target_.endswith(target)
    assert cfg.hydra.callbacks.sweep_progress._target_ == "src.sweep.SweepProgress"
    if launcher == "joblib":
        assert cfg.hydra.launcher.n_jobs == 2


# --- the named grids --------------------------------------------------------------------


GRIDS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")
               if "sweeper:" in p.read_text())


def test_the_named_grids_exist():
    assert {"nan_map", "nan_map_smoke"} <= set(GRIDS)


@pytest.mark.parametrize("name", GRIDS)
def test_experiment_grid_values_all_compose(name):
    cfg = hydra_cfg(f"experiment={name}")
    assert cfg.hydra.sweep.dir.startswith("outputs/sweeps/"), cfg.hydra.sweep.dir
    assert cfg.trainer.progress is False            # the sweep callback shows progress
    params = {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}
    assert grid_size(cfg) == math.prod(len(v) for v in params.values())
    # every value of every axis composes and passes the specs' checks
    for key, values in params.items():
        for value in values:
            override = f"{key}={value}"
            assert validate_cli([override]) is None, override
            spec = spec_from_config(plain(hydra_cfg(f"experiment={name}", override)))
            assert spec.config_hash


def test_smoke_grid_settings():
    cfg = hydra_cfg("experiment=nan_map_smoke")
    assert cfg.hydra.sweep.dir == "outputs/sweeps/nan_map_smoke"
    assert cfg.max_steps == 6 and cfg.monitor.every == 2 and cfg.data.num_train == 32
    assert cfg.logger.name == "csv"
    assert grid_size(cfg) == 8


def test_grid_size_counts_command_line_axes():
    # a command-line value replaces that axis of the grid; a command-line sweep multiplies
    cfg = hydra_cfg("experiment=nan_map_smoke")
    with open_dict(cfg):      # what a multirun's command line leaves in hydra.overrides.task
        cfg.hydra.overrides.task = ["experiment=nan_map_smoke", "lr=1e-3", "seed=0,1,2"]
    assert grid_size(cfg) == 2 * 2 * 1 * 3


# --- the progress callback --------------------------------------------------------------


def _job_return(status: str | None, failed: bool = False) -> JobReturn:
    return JobReturn(status=JobStatus.FAILED if failed else JobStatus.COMPLETED,
                     _return_value=RuntimeError("boom") if failed else status)


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
    assert re.search(r"ok 1 · stalled 0 · nonfinite 1 · diverged 0 · interrupted 0 · error 1 · "
                     r"skipped 1", out), out

    cb.on_multirun_end(cfg)      # the submitting process sees the workers' cells too
    out = capsys.readouterr().out
    assert "sweep done" in out and "4/8 cells" in out and "python -m src.report" in out
    assert not (tmp_path / ".progress").exists()


def test_progress_callback_polls_submitit_cells_from_the_submitting_process(tmp_path, capsys):
    cfg = hydra_cfg("hydra/launcher=submitit_local", "experiment=nan_map_smoke",
                    f"hydra.sweep.dir={tmp_path}")
    with open_dict(cfg):
        cfg.hydra.mode = "MULTIRUN"
    cb = SweepProgress(poll_s=0.05)
    cb.on_multirun_start(cfg)
    assert cb._stop is not None                      # the poller runs here...
    job = pickle.loads(pickle.dumps(cb))             # ...and is not pickled into the jobs
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
    cb.on_job_end(cfg, _job_return("ok"))            # RUN mode: nothing
    assert capsys.readouterr().out == ""
    with open_dict(cfg):
        cfg.hydra.mode = "MULTIRUN"
    cb.on_job_end(cfg, object())                     # no on_multirun_start, odd job return
    assert "cell #" in capsys.readouterr().out


def test_progress_line_estimates_time_left():
    line = progress_line(2, 8, {"ok": 1, "skipped": 1}, 30.0, 180.0, markup=False)
    assert line.startswith("sweep 2/8 (25%)") and "30s elapsed, ~3m00s left" in line


# --- W&B sweeps: the agent's command, built offline -------------------------------------


def agent_command(sweep_command: list[str], params: dict) -> list[str]:
    """What `wandb agent` runs for one set of sweep parameters: wandb's own
    create_sweep_command / create_sweep_command_args, and the macro substitution of
    wandb_agent.Agent._command_run (which is inline there, so repeated here)."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    command = sweep_utils.create_sweep_command(list(sweep_command))
    sweep_vars = sweep_utils.create_sweep_command_args(
        {"args": {k: {"value": v} for k, v in params.items()}})
    sweep_vars["interpreter"] = ["python"]
    sweep_vars["program"] = [None]
    sweep_vars["env"] = ["/usr/bin/env"]
    out: list[str] = []
    for c in map(str, command):
        if c.startswith("${") and c.endswith("}"):
            out += sweep_vars.get(c[2:-1]) or []
        else:
            out.append(c)
    return out


def sample_params(sweep: dict) -> list[dict]:
    """Parameter sets the sweep can send, every value of every axis in at least one of them
    (a distribution: its ends and a point between)."""
    axes = {}
    for name, p in sweep["parameters"].items():
        if "values" in p:
            axes[name] = list(p["values"])
        elif "value" in p:
            axes[name] = [p["value"]]
        else:
            assert p["distribution"] in ("log_uniform_values", "uniform", "q_log_uniform_values")
            lo, hi = float(p["min"]), float(p["max"])
            axes[name] = [lo, math.sqrt(lo * hi) * 1.2345678, hi]
    n = max(len(values) for values in axes.values())
    return [{k: v[min(i, len(v) - 1)] for k, v in axes.items()} for i in range(n)]


@pytest.mark.parametrize("name", ["grid", "bayes"])
def test_wandb_sweep_command_is_a_valid_hydra_call(name, monkeypatch):
    sweep = yaml.safe_load((WANDB_DIR / f"{name}.yaml").read_text())
    assert sweep["method"] in ("grid", "random", "bayes")
    assert sweep["metric"]["goal"] in ("minimize", "maximize")
    assert sweep["metric"]["name"].startswith("outcome/")
    if name == "bayes":
        assert sweep["parameters"]["lr"]["distribution"] == "log_uniform_values"
    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep123")
    monkeypatch.setenv("WANDB_RUN_ID", "run456")
    for params in sample_params(sweep):
        argv = agent_command(sweep["command"], params)
        assert argv[:4] == ["/usr/bin/env", "python", "-m", "src.train"], argv
        overrides = argv[4:]
        assert validate_cli(overrides) is None
        cfg = hydra_cfg(*overrides)          # Hydra parses every override (RUN mode: no sweeps)
        assert cfg.hydra.run.dir == "outputs/wandb_sweeps/sweep123/run456"
        spec = spec_from_config(plain(cfg), overrides)
        assert spec.logger.name == "wandb" and spec.logger.mode == "online"
        for key, value in params.items():
            got = cfg[key].name if key in ("precision", "softmax") else cfg[key]
            assert got == value or (isinstance(value, float) and math.isclose(got, value)), key


def test_wandb_run_dir_is_unique_without_an_agent(monkeypatch):
    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    sweep = yaml.safe_load((WANDB_DIR / "grid.yaml").read_text())
    overrides = agent_command(sweep["command"], sample_params(sweep)[0])[4:]
    run_dir = hydra_cfg(*overrides).hydra.run.dir
    assert re.fullmatch(r"outputs/wandb_sweeps/nosweep/[\d_-]+_\d{6}", run_dir), run_dir


def test_wandb_launch_scripts_parse():
    for script in ("launch.sh", "agent.sbatch"):
        assert subprocess.run(["bash", "-n", str(WANDB_DIR / script)], check=False).returncode == 0
    dry = subprocess.run(["bash", str(WANDB_DIR / "launch.sh"), "grid", "--slurm", "--dry-run",
                          "--parallel", "4"], capture_output=True, text=True, cwd=ROOT, check=False,
                         env=dict(os.environ, PATH=f"{Path(sys.executable).parent}:"
                                  + os.environ["PATH"]))
    assert dry.returncode == 0, dry.stderr
    sweep = yaml.safe_load((WANDB_DIR / "grid.yaml").read_text())
    size = math.prod(len(p["values"]) for p in sweep["parameters"].values())
    assert f"sbatch --array=0-{size - 1}%4 experiments/wandb/agent.sbatch" in dry.stderr


# --- end to end: the real CLI -----------------------------------------------------------


@pytest.fixture(scope="module")
def basic_sweep(tmp_path_factory):
    """The README's sweep with a bad cell in the middle: one process, three cells."""
    out = tmp_path_factory.mktemp("basic_sweep")
    started = time.time()
    proc = ok(cli("precision=bf16", "softmax=stable", "-m", "lr=1e-5,-1,5e-5", *TINY,
                  f"hydra.sweep.dir={out}"))
    print(f"basic launcher, 3 cells: {time.time() - started:.1f} s")
    return out, proc


def test_multirun_basic_launcher_leaves_one_record_per_cell(basic_sweep):
    out, proc = basic_sweep
    df = collect(out)
    assert sorted(df["lr"]) == [-1, 1e-5, 5e-5]
    assert set(df["precision"]) == {"bf16"} and set(df["softmax"]) == {"stable"}
    assert set(df[df["lr"] > 0]["status"]) <= {"ok", "nonfinite", "diverged"}
    assert "sweep 3/3 (100%)" in proc.stdout and "sweep done" in proc.stdout


def test_multirun_bad_cell_is_an_error_record_and_the_sweep_goes_on(basic_sweep):
    out, proc = basic_sweep
    recs = {r.lr: r for r in records(out).values()}
    assert set(recs) == {1e-5, -1.0, 5e-5}          # the cell after the bad one ran too
    assert recs[-1.0].status == "error" and "lr=-1" in recs[-1.0].error
    assert recs[-1.0].precision == "bf16" and recs[-1.0].softmax == "stable"
    assert "error 1" in proc.stdout


@pytest.mark.slow
def test_multirun_submitit_local_leaves_one_record_per_cell(tmp_path):
    ok(cli("hydra/launcher=submitit_local", "precision=bf16", "softmax=stable", "-m",
           "lr=1e-5,5e-5", *TINY, f"hydra.sweep.dir={tmp_path}"))
    df = collect(tmp_path)
    assert sorted(df["lr"]) == [1e-5, 5e-5]
    assert set(df["status"]) <= {"ok", "nonfinite", "diverged"}
    assert list(tmp_path.glob(".submitit/*/*_log.out")), "submitit ran the jobs"


@pytest.mark.slow
def test_rerun_skips_done_cells_and_force_reruns(tmp_path):
    # the smoke grid with the precision and softmax axes pinned: two cells (lr 1e-3, 0.3)
    args = ["-m", "experiment=nan_map_smoke", "precision=fp32", "softmax=stable", "max_steps=2",
            "data.num_train=8", f"hydra.sweep.dir={tmp_path}"]
    ok(cli(*args))
    first = records(tmp_path)
    assert sorted(r.lr for r in first.values()) == [1e-3, 0.3]
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("record.json")}

    started = time.time()
    again = ok(cli(*args))
    print(f"re-run with every cell done: {time.time() - started:.1f} s")
    assert again.stdout.count("skip:") == 2, again.stdout
    assert "Trainer.fit" not in again.stdout + again.stderr
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("record.json")} == mtimes
    assert "skipped 2" in again.stdout

    forced = ok(cli(*args[:-1], "lr=1e-3", "force=true", f"hydra.sweep.dir={tmp_path}"))
    assert "skip:" not in forced.stdout
    changed = [p for p, t in mtimes.items() if p.stat().st_mtime_ns != t]
    assert [read_record(p).lr for p in changed] == [1e-3]
    assert len(collect(tmp_path)) == 2


def test_wandb_logger_joins_the_agents_run(tmp_path, monkeypatch, capsys):
    """What a W&B agent's child does, offline and without training: the env the agent sets
    (sweep id, run id, parameter file) makes train.py's WandbLogger join that run; the
    outcome goes into its summary and a run that did not stay finite finishes failed."""
    import wandb
    from wandb.sdk.wandb_run import Run

    from src.record import Record
    from src.train import _finish_logger, _logger

    sweep = yaml.safe_load((WANDB_DIR / "grid.yaml").read_text())
    params = {"precision": "bf16", "softmax": "stable", "lr": 0.01, "seed": 0}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"wandb_version": 1, **{k: {"value": v} for k, v in params.items()}}))
    run_id = "nl" + os.urandom(3).hex()
    for key, value in {"WANDB_SWEEP_ID": "sweeptest", "WANDB_RUN_ID": run_id,
                       "WANDB_SWEEP_PARAM_PATH": str(tmp_path / "params.yaml"),
                       "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path)}.items():
        monkeypatch.setenv(key, value)
    overrides = agent_command(sweep["command"], params)[4:]
    overrides = ["logger.mode=offline" if o == "logger.mode=online" else o for o in overrides]
    cfg = hydra_cfg(*overrides)
    run_dir = tmp_path / Path(cfg.hydra.run.dir).relative_to("outputs")
    assert run_dir.parts[-2:] == ("sweeptest", run_id)
    spec = spec_from_config(plain(cfg), overrides)

    finished = {}
    original = Run.finish

    def spy(self, exit_code=None):
        keys = list(self.summary.keys())
        finished.update(exit_code=exit_code, summary={k: self.summary[k] for k in keys})
        return original(self, exit_code=exit_code)

    monkeypatch.setattr(Run, "finish", spy)
    try:
        logger = _logger(spec, run_dir)
        run = logger.experiment
        assert (run.id, run.sweep_id) == (run_id, "sweeptest")
        assert run.config["lr"] == 0.01 and run.config["precision"] == "bf16"
        _finish_logger(logger, Record(status="nonfinite", lr=0.01, first_bad_step=3))
    finally:
        wandb.teardown()
    assert "could not finish the logger" not in capsys.readouterr().err
    assert finished["exit_code"] == 1
    assert finished["summary"]["outcome/status"] == "nonfinite"
    assert finished["summary"]["outcome/first_bad_step"] == 3
    assert next((run_dir / "wandb").glob("offline-run-*")).name.endswith(run_id)
