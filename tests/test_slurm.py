"""SLURM end to end: sweeps submitted to a real SLURM cluster through `hydra/launcher=slurm_local`
(what `make sweep SLURM_LAUNCHER=slurm_local` runs), with preemption and a time limit.

They need a cluster that answers `sinfo` and runs jobs on this machine (the sweep dirs are
under pytest's tmp dir): `sudo bash experiments/slurm/local_cluster.sh start` starts a
one-node one, and CI (.ci/run) does. Where none answers they skip and say why;
NANLAB_REQUIRE_SLURM=1 turns that skip into a failure (CI sets it once the cluster is up).

The sbatch flags the launcher configs render into are checked without SLURM (fast tier).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from nanlab.config.compose import CONF_DIR
from nanlab.record import flatten
from nanlab.sweep.slurm import slurm_state, squeue_info

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_SCRIPT = ROOT / "experiments" / "slurm" / "local_cluster.sh"
# fp32 / stable / lr 1e-3 trains without incident: used where only the SLURM side matters
QUIET = ["precision=fp32", "softmax=stable", "lr=1e-3"]


# --- without SLURM: what the launcher configs ask SLURM for ------------------------------


def sbatch_script(tmp_path, monkeypatch, *overrides: str) -> str:
    """The sbatch script the launcher would submit for a 5-cell array (SlurmLauncher.launch
    builds the executor this way; no SLURM here: the srun probe is patched)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from submitit.slurm import slurm

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="config",
            return_hydra_config=True,
            overrides=[*overrides, f"hydra.sweep.dir={tmp_path}"],
        )
    monkeypatch.setattr(slurm.SlurmExecutor, "affinity", staticmethod(lambda: 2))
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params.pop("_target_") == "hydra_plugins.nanlab.slurm_launcher.SlurmLauncher"
    assert params["submitit_folder"] == f"{tmp_path}/.submitit/%j"
    executor = submitit.AutoExecutor(
        folder=params.pop("submitit_folder"),
        cluster="slurm",
        slurm_max_num_timeout=params.pop("max_num_timeout"),
    )
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    return slurm._make_sbatch_string(
        command="python -m x", folder=tmp_path, map_count=5, **executor._executor.parameters
    )


def test_slurm_launcher_composes_into_sbatch_flags(tmp_path, monkeypatch):
    script = sbatch_script(
        tmp_path,
        monkeypatch,
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.gpus_per_node=2",
        "hydra.launcher.timeout_min=90",
        "hydra.launcher.array_parallelism=3",
        "hydra.launcher.mem_gb=16",
    )
    # no early USR2 (submitit's handler would turn a time limit into an error record): SLURM's
    # SIGTERM at the limit, which the run records as `interrupted`
    for flag in (
        "--partition=gpu",
        "--gpus-per-node=2",
        "--time=90",
        "--mem=16GB",
        "--cpus-per-task=8",
        "--requeue",
        "--array=0-4%3",
        "--signal=TERM@0",
    ):
        assert f"#SBATCH {flag}\n" in script, (flag, script)
    assert "USR2" not in script


def test_slurm_local_asks_for_a_cpu_cell(tmp_path, monkeypatch):
    script = sbatch_script(tmp_path, monkeypatch, "hydra/launcher=slurm_local")
    for flag in ("--cpus-per-task=1", "--mem=4GB", "--time=30", "--requeue", "--signal=TERM@0"):
        assert f"#SBATCH {flag}\n" in script, (flag, script)
    assert "gpus" not in script and "--partition" not in script


def test_squeue_states_are_read_and_named():
    text = (
        "JOBID|STATE|RESTART_COUNT|NODELIST|\n41_0|RUNNING|0|vm|\n41_1|PENDING|1||\n"
        "41_2|TIMEOUT|0|vm|\n7_0|RUNNING|0|vm|\n"
    )
    info = squeue_info(text, {"41"})
    assert set(info) == {"41_0", "41_1", "41_2"}  # another user's array left out
    assert info["41_1"]["RestartCnt"] == "1"
    assert [slurm_state(info[k]["State"]) for k in sorted(info)] == [
        "running",
        "pending",
        "timeout",
    ]
    assert slurm_state("CANCELLED by 0") == "cancelled" and slurm_state(None) == "unknown"


# --- with SLURM ---------------------------------------------------------------------------


def slurm_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    conf = Path(os.environ.get("NANLAB_SLURM_DIR", "/tmp/nanlab-slurm")) / "slurm.conf"
    if "SLURM_CONF" not in env and conf.exists() and not Path("/etc/slurm/slurm.conf").exists():
        env["SLURM_CONF"] = str(conf)  # the local cluster, where it could not link /etc/slurm
    return env


def unavailable(env: dict[str, str]) -> str | None:
    """Why no SLURM cluster can run these tests here, or None."""
    start = f"(start one: sudo bash {CLUSTER_SCRIPT.relative_to(ROOT)} start)"
    missing = [
        t for t in ("sbatch", "squeue", "sinfo", "scontrol", "scancel") if not shutil.which(t)
    ]
    if missing:
        return f"no SLURM client tools ({', '.join(missing)} not on PATH) {start}"
    try:
        proc = subprocess.run(
            ["sinfo", "--noheader", "--responding", "-o", "%a %t"],
            env=env,
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"sinfo did not answer in 20 s {start}"
    if proc.returncode != 0:
        return f"no SLURM controller answers: {proc.stderr.strip()[:200]} {start}"
    if not re.search(r"^up (idle|mix|alloc)", proc.stdout, re.MULTILINE):
        return f"no SLURM partition up with a usable node: {proc.stdout.strip()!r} {start}"
    return None


@pytest.fixture(scope="module")
def slurm() -> dict[str, str]:
    env = slurm_env()
    reason = unavailable(env)
    if reason:
        if os.environ.get("NANLAB_REQUIRE_SLURM") == "1":
            pytest.fail(f"NANLAB_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    return env


def sweep_args(out: Path, *overrides: str, launcher: str = "slurm_local") -> list[str]:
    return [
        sys.executable,
        "-m",
        "src.train",
        "-m",
        "experiment=nan_map_smoke",
        f"hydra/launcher={launcher}",
        f"hydra.sweep.dir={out}",
        "hydra.callbacks.sweep_progress.poll_s=2",
        *overrides,
    ]


def run_sweep(
    env: dict, out: Path, *overrides: str, launcher: str = "slurm_local", timeout: int = 420
) -> str:
    proc = subprocess.run(
        sweep_args(out, *overrides, launcher=launcher),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    return output


class Sweep:
    """A sweep running in the background, to act on its SLURM tasks while it runs."""

    def __init__(self, env: dict, out: Path, *overrides: str) -> None:
        self.env, self.out = env, out
        self.earlier = set(self._tasks())  # an earlier sweep's tasks in this dir
        self.log = (out.parent / f"{out.name}.log").open("w+")
        self.proc = subprocess.Popen(
            sweep_args(out, *overrides),
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def _tasks(self) -> list[str]:
        return sorted(p.name for p in (self.out / ".submitit").glob("*_*"))

    def task(self, num: int, timeout: float = 120) -> str:
        """SLURM's id of this sweep's task that runs cell `num`, e.g. 41_1."""
        return wait_for(
            lambda: [t for t in self._tasks() if t.endswith(f"_{num}") and t not in self.earlier],
            timeout,
        )[0]

    def finish(self, timeout: float = 420) -> str:
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            for task in set(self._tasks()) - self.earlier:  # leave no job behind
                subprocess.run(["scancel", task], env=self.env, capture_output=True, check=False)
        self.log.seek(0)
        output = self.log.read()
        killed = f" (killed by signal {-self.proc.returncode})" if self.proc.returncode < 0 else ""
        assert self.proc.returncode == 0, output[-5000:] + killed
        return output


def wait_for(probe, timeout: float, every: float = 0.5):
    end = time.time() + timeout
    while time.time() < end:
        value = probe()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"gave up after {timeout:.0f} s waiting for {probe}")


def training(run_dir: Path, version: int = 0) -> bool:
    """The cell's run has started its training loop (the CSV logger's version dir exists):
    src.train's signal handler is in place."""
    return (run_dir / "csv" / f"version_{version}").is_dir()


def records(root: Path) -> dict[str, dict]:
    """run dir name -> record's flat fields (record.json's sections, flattened)"""
    return {
        p.parent.name: flatten(json.loads(p.read_text()))
        for p in sorted(root.glob("*/record.json"))
    }


def summary(output: str) -> str:
    """The final `sweep done` panel as one line (rich wraps it to the terminal's width)."""
    assert "sweep done" in output, output[-3000:]
    return re.sub(r"[\s│╭╮╰╯─]+", " ", output[output.rindex("sweep done") :])


def scontrol(env: dict, *args: str) -> None:
    subprocess.run(["scontrol", *args], env=env, check=True, capture_output=True, timeout=30)


WARM: list[bool] = []  # a run in this session has built the caches (tokenizer, tiny base)


def warm_caches(env: dict, tmp_path: Path) -> None:
    """Build the caches once before a sweep whose cells have only a minute: a cold tiny base
    takes longer than that to build (the cells would wait for it on its file lock)."""
    if not WARM:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "src.train",
                "experiment=nan_map_smoke",
                "max_steps=1",
                "logger=none",
                f"hydra.run.dir={tmp_path}/warm",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        WARM.append(True)


@pytest.mark.slow
def test_smoke_grid_through_slurm_matches_the_local_launcher(slurm, tmp_path):
    cells = ["precision=bf16"]  # 4 of the smoke grid's 8 cells: softmax x lr
    # the local sweep (one cell after another in one process) runs meanwhile
    local = subprocess.Popen(
        sweep_args(tmp_path / "local", *cells, launcher="basic"),
        cwd=ROOT,
        env=slurm,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output = run_sweep(slurm, tmp_path / "slurm", *cells)
        here_output = local.communicate(timeout=420)[0]
    finally:
        local.kill()
    assert local.returncode == 0, here_output[-3000:]
    WARM.append(True)

    on_slurm, here = records(tmp_path / "slurm"), records(tmp_path / "local")
    assert sorted(on_slurm) == ["0", "1", "2", "3"], "one record per cell"

    def outcomes(recs):
        return {r["config_hash"]: (r["status"], r["first_bad_step"]) for r in recs.values()}

    assert outcomes(on_slurm) == outcomes(here)
    assert len(outcomes(on_slurm)) == 4
    assert all(r["attempt"] == 1 for r in on_slurm.values())
    # the SLURM states, truthfully, and the same counts as the local sweep; no poll warnings
    assert re.search(r"slurm \d+: completed 4 ", summary(output)), summary(output)
    assert re.search(r"slurm \d+: (pending|running)", output), output[-3000:]
    counts = re.compile(
        r"ok \d+ · stalled \d+ · nonfinite \d+ · diverged \d+ · "
        r"interrupted \d+ · error \d+ · skipped \d+"
    )
    here_counts, slurm_counts = (
        counts.findall(summary(here_output)),
        counts.findall(summary(output)),
    )
    assert len(slurm_counts) == 1 and here_counts == slurm_counts, (here_counts, slurm_counts)
    assert "sacct" not in output and "Bypassing" not in output


# One sweep for preemption and the time limit (they share its minute of waiting): three
# cells with a 1-min limit, SLURM's shortest. Cell 0 trains 4 steps; cell 1 trains 20 steps
# and SLURM requeues it while it runs (what preemption does); cell 2 would train 100000 steps
# and hits the time limit.
# cell 2 must still be training when its minute runs out: a lower lr and no divergence
# verdict keep it from ending early (fused AdamW made its steps fast enough to diverge first)
PREEMPTION = [
    *(o for o in QUIET if not o.startswith("lr=")),
    "lr=1e-4",
    "max_steps=4,20,100000",
    "hydra.launcher.timeout_min=1",
    "monitor.diverge_factor=1e6",
]


@pytest.fixture(scope="module")
def preempted(slurm, tmp_path_factory) -> tuple[Path, str, dict[str, dict]]:
    out = tmp_path_factory.mktemp("preemption") / "sweep"
    warm_caches(slurm, out.parent)
    sweep = Sweep(slurm, out, *PREEMPTION)
    try:
        task = sweep.task(1)
        wait_for(lambda: training(out / "1"), timeout=180)
        scontrol(slurm, "requeue", task)
    finally:
        output = sweep.finish()
    return out, output, records(out)


@pytest.mark.slow
def test_a_requeued_task_runs_again_and_leaves_one_record(preempted):
    _, output, recs = preempted
    assert sorted(recs) == ["0", "1", "2"], "exactly one record per cell"
    assert [recs[n]["max_steps"] for n in ("0", "1", "2")] == [4, 20, 100000]
    assert "error" not in {r["status"] for r in recs.values()}
    assert recs["1"]["status"] in ("ok", "stalled"), recs["1"]  # it ran to the end ...
    assert recs["1"]["steps_done"] == 20
    assert recs["1"]["attempt"] == 2, recs["1"]  # ... on its second start
    assert recs["0"]["attempt"] == 1 and recs["2"]["attempt"] == 1
    # SLURM's final states: cell 2 timed out (below); cell 1 completed unless a loaded machine
    # made its second start outlast the minute after writing its record
    assert re.search(r"slurm \d+: completed [12] · timeout [12] · requeued 1 ", summary(output)), (
        summary(output)
    )
    assert re.search(r"requeued 1", output[: output.rindex("sweep done")]), "live, too"


@pytest.mark.slow
def test_a_timed_out_cell_is_recorded_interrupted_and_a_rerun_redoes_only_it(slurm, preempted):
    out, output, recs = preempted
    assert recs["2"]["status"] == "interrupted", recs["2"]
    assert recs["2"]["signal"] == "SIGTERM" and recs["2"]["steps_done"] > 0
    assert "interrupted 1 · error 0 · skipped 0" in summary(output), summary(output)
    assert "cell #2 interrupted (SLURM timeout" in output, output[-3000:]
    done = {n: (out / n / "record.json").stat().st_mtime_ns for n in ("0", "1")}

    # the rerun skips the finished cells and trains the interrupted one again; once that has
    # started, cancel it (a second minute-long time limit would show nothing new)
    rerun = Sweep(slurm, out, *PREEMPTION)
    try:
        task = rerun.task(2)
        wait_for(lambda: training(out / "2", version=1), timeout=180)
        subprocess.run(["scancel", task], env=slurm, check=True, timeout=30)
    finally:
        output = rerun.finish()
    assert {n: (out / n / "record.json").stat().st_mtime_ns for n in ("0", "1")} == done, (
        "the done cells were kept"
    )
    again = records(out)["2"]
    assert again["status"] == "interrupted" and again["wall_time_s"] != recs["2"]["wall_time_s"]
    assert "interrupted 1 · error 0 · skipped 2" in summary(output), summary(output)
    assert re.search(r"slurm \d+: completed 2 · cancelled 1 ", summary(output)), summary(output)
