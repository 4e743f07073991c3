"""Sweep-level progress: a Hydra callback that reports cells done / total, outcomes so far,
elapsed and estimated time left.

Configured in conf/config.yaml under `hydra.callbacks.sweep_progress`; active in MULTIRUN
only. An entry-level helper (it may import hydra), never imported by the modules below.

Where the hooks run depends on the launcher:

* basic launcher: every hook in this process, one cell after another;
* joblib / submitit: `on_multirun_start` and `on_multirun_end` here, `on_job_start` and
  `on_job_end` in the worker that runs the cell (a copy of this object, pickled after
  `on_multirun_start`, so it knows the total and the start time).

So that every process sees the whole sweep, each finished cell leaves a small marker file
`<sweep dir>/.progress/<session>/<job num>.json` (status, duration); counts are read back
from those. Where they cannot be written the callback falls back to what this process saw.
Nothing here may fail a job: every hook swallows its own errors.

SLURM (`hydra/launcher=slurm`, `slurm_local`) goes through `SlurmLauncher` below, Hydra's
submitit launcher with three changes: job states come from `squeue` where `sacct` has no
accounting database (submitit polls sacct only, and warned on every poll); a task that ended
without a result (time limit, scancel, node failure) is collected from its record instead of
failing the whole sweep; and the progress line and the summary show the SLURM states
(pending, running, requeued, completed, timeout, ...).
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import (
    SlurmLauncher as _SubmititSlurmLauncher,
)

from .record import RECORD_NAME, STATUSES

OUTCOMES = (*STATUSES, "skipped")       # ok, ..., interrupted, error, skipped
STYLE = {"ok": "green", "stalled": "cyan", "nonfinite": "bold red", "diverged": "yellow",
         "interrupted": "blue", "error": "magenta", "skipped": "dim"}
PROGRESS_DIR = ".progress"
log = logging.getLogger(__name__)
_ACTIVE: list[SweepProgress] = []       # this process's sweep callback (the submitting one)


def grid_size(config: Any) -> int | None:
    """How many cells the sweep has: `hydra.sweeper.params` x the command line's sweeps,
    exactly as the configured sweeper expands them (Hydra's BasicSweeper or a subclass, such
    as the map's mechanism sweeper). None for other sweepers (unless they say `n_trials`) or
    when the overrides cannot be parsed here."""
    try:
        sweeper = config.hydra.sweeper
        if sweeper.get("n_trials"):
            return int(sweeper.get("n_trials"))
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra.utils import get_class
        from omegaconf import OmegaConf

        cls = get_class(str(sweeper.get("_target_", "")))
        if not issubclass(cls, BasicSweeper):
            return None
        kwargs = OmegaConf.to_container(sweeper, resolve=True)
        kwargs.pop("_target_", None)
        params = sweeper.get("params") or {}
        args = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
        overrides = OverridesParser.create().parse_overrides(args)
        return sum(len(batch) for batch in cls(**kwargs).split_arguments(overrides, None))
    except Exception:  # noqa: BLE001 - a display, never a reason to stop
        return None


def job_outcome(config: Any, job_return: Any) -> str:
    """A finished job's outcome: the task's return value (src.train.hydra_job returns the
    status, or "skipped"), else the record in its output dir, else "error"."""
    from hydra.core.utils import JobStatus

    if getattr(job_return, "status", None) == JobStatus.FAILED:
        return "error"
    value = getattr(job_return, "_return_value", None)
    if isinstance(value, str) and value in OUTCOMES:
        return value
    out = _select(config, "hydra.runtime.output_dir", "")
    try:
        status = json.loads((Path(str(out)) / RECORD_NAME).read_text()).get("status") if out else None
    except (OSError, ValueError, AttributeError):
        status = None
    return status if status in OUTCOMES else "error"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds) or seconds < 0:
        return "?"
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def eta(elapsed: float, done: int, skipped: int, total: int | None) -> float | None:
    """Time left, from the wall time per cell that trained (skipped cells take ~0 s), so
    parallel launchers are accounted for; assumes the cells left all train."""
    trained = done - skipped
    if total is None or trained <= 0:
        return None
    return elapsed / trained * max(total - done, 0)


def progress_line(done: int, total: int | None, counts: dict[str, int], elapsed: float | None,
                  left: float | None, markup: bool = True, slurm: str = "") -> str:
    """`sweep 3/8 (38%) │ ok 2 · nonfinite 1 · … │ 1m02s elapsed, ~1m40s left`; with SLURM,
    the tasks' states before the time: `│ slurm 41: pending 2 · running 2 · completed 4`"""
    of = f"/{total} ({100 * done / total:.0f}%)" if total else ""
    when = f"{fmt_duration(elapsed)} elapsed" if elapsed is not None else ""
    if total is not None and done >= total:
        when += ", finished"
    elif left is not None:
        when += f", ~{fmt_duration(left)} left"
    head = f"[bold]sweep {done}{of}[/]" if markup else f"sweep {done}{of}"
    return (f"{head} │ {counts_text(counts, markup)}" + (f" │ {slurm}" if slurm else "")
            + (f" │ {when}" if when else ""))


def counts_text(counts: dict[str, int], markup: bool = True) -> str:
    """`ok 2 · nonfinite 1 · diverged 0 · error 0 · skipped 0`, coloured where non-zero."""
    parts = []
    for name in OUTCOMES:
        text = f"{name} {counts.get(name, 0)}"
        style = STYLE.get(name, "bold")
        parts.append(f"[{style}]{text}[/]" if markup and counts.get(name) else text)
    return " · ".join(parts)


def _print(text: str) -> None:
    try:
        from rich.console import Console

        Console(highlight=False, soft_wrap=True).print(text)
    except Exception:  # noqa: BLE001 - no rich, or no terminal: plain text
        import re

        print(re.sub(r"\[/?[a-z ]*\]", "", text))
    sys.stdout.flush()


class SweepProgress(Callback):
    """Prints a progress line after each cell of a multirun and a summary at its end.

    With submitit (local or SLURM) the cells print into their own logs and the submitting
    process only waits, so there a thread polls the markers every `poll_s` seconds and prints
    a line when the count changes (0 turns it off)."""

    def __init__(self, enabled: bool = True, keep_markers: bool = False,
                 poll_s: float = 15.0) -> None:
        self.enabled = enabled
        self.keep_markers = keep_markers
        self.poll_s = poll_s
        self.t0: float | None = None
        self.total: int | None = None
        self.sweep_dir: Path | None = None
        self.session: str | None = None
        self.launcher = ""
        self.seen: dict[int, dict] = {}     # what this process saw: job num -> marker
        self._job_t0: float | None = None
        self._stop: threading.Event | None = None      # the submitit poller, this process only

    def __getstate__(self) -> dict:
        # the launcher pickles this object into every job: no thread, no event
        return {k: v for k, v in self.__dict__.items() if k != "_stop"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._stop = None

    # --- hooks --------------------------------------------------------------------------

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        if not self.enabled:
            return
        try:
            self.t0 = time.time()
            self.total = grid_size(config)
            self.sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
            self.session = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
            target = str(config.hydra.launcher.get("_target_", ""))
            self.launcher = target.rsplit(".", 1)[-1]
            _ACTIVE[:] = [self]
            SLURM_JOBS.clear()
            cells = f"{self.total} cells" if self.total is not None else "cells"
            _print(f"[bold]sweep:[/] {cells} → {self.sweep_dir} ({self.launcher})")
            if ("submitit" in target or "slurm" in target.lower()) and self.poll_s > 0:
                self._stop = threading.Event()
                threading.Thread(target=self._poll, args=(self._stop,), daemon=True,
                                 name="sweep-progress").start()
        except Exception as e:  # noqa: BLE001
            _warn("on_multirun_start", e)

    def _poll(self, stop: threading.Event) -> None:
        shown: tuple = (0, "")
        while not stop.wait(self.poll_s):
            try:
                slurm = SLURM_JOBS.summary(refresh_s=self.poll_s) if SLURM_JOBS else ""
                now = (len(self._markers()), slurm)
                if now != shown:
                    shown = now
                    _print(self._status_line(slurm))
            except Exception:  # noqa: BLE001, S112 - try again at the next tick
                continue

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        self._job_t0 = time.time()

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        if not self.enabled or not _is_multirun(config):
            return
        try:
            status = job_outcome(config, job_return)
            num = _select(config, "hydra.job.num", len(self.seen))
            took = time.time() - self._job_t0 if self._job_t0 else None
            marker = {"num": num, "status": status, "seconds": took, "end": time.time()}
            self.seen[num] = marker
            self._write_marker(config, marker)
            cell = f"[{STYLE.get(status, '')}]{status}[/]"
            _print(f"cell #{num} {cell} ({fmt_duration(took)}) │ {self._status_line()}")
        except Exception as e:  # noqa: BLE001
            _warn("on_job_end", e)

    def _status_line(self, slurm: str = "") -> str:
        markers = self._markers()
        counts = _count(markers)
        elapsed = time.time() - self.t0 if self.t0 else None
        left = eta(elapsed, len(markers), counts["skipped"], self.total) if elapsed else None
        return progress_line(len(markers), self.total, counts, elapsed, left, slurm=slurm)

    def note(self, num: int, status: str, seconds: float | None, why: str = "") -> None:
        """A cell whose worker could not report itself (SLURM ended it before `on_job_end`):
        the launcher says what its record says."""
        marker = {"num": num, "status": status, "seconds": seconds, "end": time.time()}
        self.seen[num] = marker
        self._write_marker(None, marker)
        cell = f"[{STYLE.get(status, '')}]{status}[/]"
        _print(f"cell #{num} {cell}{f' ({why})' if why else ''} │ {self._status_line()}")

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        if not self.enabled:
            return
        if self._stop is not None:
            self._stop.set()
        try:
            markers = self._markers()
            counts = _count(markers)
            elapsed = time.time() - self.t0 if self.t0 else None
            done = len(markers)
            of = f"{done}/{self.total}" if self.total is not None else f"{done}"
            took = f" in {fmt_duration(elapsed)}" if elapsed is not None else ""
            sweep_dir = self.sweep_dir or Path(str(_select(config, "hydra.sweep.dir", ".")))
            lines = [f"{of} cells{took}", counts_text(counts),
                     f"records: {sweep_dir}", f"report:  python -m src.report {sweep_dir}"]
            if SLURM_JOBS:
                lines.insert(2, SLURM_JOBS.summary(final=True))
            try:
                from rich.console import Console
                from rich.panel import Panel

                Console(highlight=False).print(Panel("\n".join(lines), title="sweep done",
                                                     expand=False))
            except Exception:  # noqa: BLE001
                _print("sweep done: " + "; ".join(lines))
            _ACTIVE.clear()
            if not self.keep_markers and self._session_dir() is not None:
                shutil.rmtree(self._session_dir(), ignore_errors=True)
                try:
                    self._session_dir().parent.rmdir()   # only when no other session is left
                except OSError:
                    pass
        except Exception as e:  # noqa: BLE001
            _warn("on_multirun_end", e)

    # --- markers ------------------------------------------------------------------------

    def _session_dir(self) -> Path | None:
        if self.sweep_dir is None or self.session is None:
            return None
        return self.sweep_dir / PROGRESS_DIR / self.session

    def _write_marker(self, config: Any, marker: dict) -> None:
        folder = self._session_dir()
        if folder is None:      # on_multirun_start did not run for this object
            return
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{marker['num']}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(marker))
            os.replace(tmp, folder / f"{marker['num']}.json")
        except OSError:
            pass                # read-only or vanished: fall back to what this process saw

    def _markers(self) -> dict[int, dict]:
        found = dict(self.seen)
        folder = self._session_dir()
        if folder is not None and folder.is_dir():
            for path in folder.glob("*.json"):
                try:
                    marker = json.loads(path.read_text())
                    found[int(marker["num"])] = marker
                except (OSError, ValueError, KeyError):
                    continue
        return found


def _count(markers: dict[int, dict]) -> dict[str, int]:
    counts = {name: 0 for name in OUTCOMES}
    for marker in markers.values():
        counts[marker.get("status", "error")] = counts.get(marker.get("status", "error"), 0) + 1
    return counts


def _select(config: Any, key: str, default: Any) -> Any:
    """config's value at a dotted key, or default where it is missing or not set."""
    try:
        from omegaconf import OmegaConf

        value = OmegaConf.select(config, key, default=default, throw_on_missing=False)
        return default if value is None else value
    except Exception:  # noqa: BLE001
        return default


def _is_multirun(config: Any) -> bool:
    try:
        return str(config.hydra.mode) in ("RunMode.MULTIRUN", "MULTIRUN")
    except Exception:  # noqa: BLE001
        return False


def _warn(hook: str, e: Exception) -> None:
    print(f"warning: sweep progress ({hook}): {type(e).__name__}: {e}", file=sys.stderr)


# --- SLURM ------------------------------------------------------------------------------

# SLURM's job states (squeue --Format=State, sacct -o State), as the progress line names them
SLURM_STATE_NAMES = {
    "PENDING": "pending", "CONFIGURING": "pending", "REQUEUED": "requeued",
    "REQUEUE_HOLD": "requeued", "REQUEUE_FED": "requeued", "RESIZING": "running",
    "RUNNING": "running", "COMPLETING": "completing", "STAGE_OUT": "completing",
    "SUSPENDED": "suspended", "STOPPED": "suspended", "SIGNALING": "running",
    "COMPLETED": "completed", "TIMEOUT": "timeout", "CANCELLED": "cancelled",
    "FAILED": "failed", "NODE_FAIL": "node_fail", "OUT_OF_MEMORY": "out_of_memory",
    "PREEMPTED": "preempted", "BOOT_FAIL": "boot_fail", "DEADLINE": "deadline",
    "REVOKED": "revoked", "SPECIAL_EXIT": "special_exit",
}
# in display order; `gone`: no longer known to squeue (finished longer than MinJobAge ago)
SLURM_ORDER = ("pending", "requeued", "running", "completing", "suspended", "completed",
               "timeout", "cancelled", "failed", "out_of_memory", "node_fail", "preempted",
               "boot_fail", "deadline", "revoked", "special_exit", "gone", "unknown")
# ended, and not by finishing: a task in one of these wrote no result (src.train stops with
# SystemExit after writing an `interrupted` record), so waiting for one is pointless
ENDED_EARLY = {"timeout", "cancelled", "failed", "out_of_memory", "node_fail", "preempted",
               "boot_fail", "deadline", "revoked", "gone"}


def slurm_state(raw: str | None) -> str:
    """`CANCELLED by 0` -> cancelled, `RUNNING` -> running, None -> unknown."""
    word = (raw or "").split(" ")[0].rstrip("+").upper()
    return SLURM_STATE_NAMES.get(word, word.lower() or "unknown")


def accounting_works() -> bool:
    """Whether sacct answers here (it needs slurmdbd; a cluster without it says
    `Slurm accounting storage is disabled` and exits 1)."""
    try:
        proc = subprocess.run(["sacct", "--noheader", "-X", "-j", "1", "-o", "JobID"],
                              capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.returncode == 0


def squeue_info(text: str, wanted: set[str]) -> dict[str, dict[str, str]]:
    """`squeue --array --states=all --Format=JobArrayID:|,State:|,RestartCnt:|,NodeList:|`
    output -> {"<array id>_<task>": {"JobID", "State", "RestartCnt", "NodeList"}}, for the
    array jobs in `wanted` (squeue lists a finished job for MinJobAge, 300 s by default)."""
    info: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        cols = [c.strip() for c in line.split("|")]
        if len(cols) < 3 or not cols[0] or not cols[0][0].isdigit():
            continue                                 # the header, or an empty line
        job_id = cols[0]
        if job_id.split("_")[0] in wanted:
            info[job_id] = {"JobID": job_id, "State": cols[1], "RestartCnt": cols[2],
                            "NodeList": cols[3] if len(cols) > 3 else ""}
    return info


def _watcher_class():
    """A submitit SLURM watcher that asks squeue where sacct has no database (defined on
    first use: submitit is imported only when a SLURM sweep runs)."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    class SlurmStates(SlurmInfoWatcher):
        def __init__(self, delay_s: int = 30) -> None:
            super().__init__(delay_s=delay_s)
            self.source: str | None = None       # "sacct" or "squeue", decided on first use
            self.restarts: dict[str, int] = {}   # job id -> times SLURM requeued it
            self._was_running: set[str] = set()

        def _make_command(self) -> list[str] | None:
            to_check = {x.split("_")[0] for x in self._registered - self._finished}
            if not to_check:
                return None
            if self.source is None:
                self.source = "sacct" if accounting_works() else "squeue"
                log.info("SLURM job states from %s", self.source)
            if self.source == "sacct":
                return super()._make_command()
            # no --jobs: squeue fails on an id it has purged; one call for all of ours
            return ["squeue", "--array", "--states=all", f"--user={_user()}",
                    "--Format=JobArrayID:|,State:|,RestartCnt:|,NodeList:|"]

        def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
            if self.source != "squeue":
                info = super().read_info(string)
            else:
                text = string.decode() if isinstance(string, bytes) else string
                pending = self._registered - self._finished
                info = squeue_info(text, {x.split("_")[0] for x in pending})
                if text.strip():       # squeue answered: what it does not list has ended
                    for job_id in pending - set(info):
                        info[job_id] = {"JobID": job_id, "State": "GONE"}
            for job_id, row in info.items():
                state = slurm_state(row.get("State"))
                count = int(row["RestartCnt"]) if str(row.get("RestartCnt", "")).isdigit() else 0
                if state == "running":
                    self._was_running.add(job_id)
                elif state in ("pending", "requeued") and job_id in self._was_running:
                    count = max(count, self.restarts.get(job_id, 0) + 1)   # seen requeued
                    self._was_running.discard(job_id)
                self.restarts[job_id] = max(self.restarts.get(job_id, 0), count)
            return info

    return SlurmStates


def _user() -> str:
    import getpass

    return getpass.getuser()


class SlurmTasks:
    """The SLURM tasks of this process's sweep: job num -> submitit job, and their states as
    the watcher last saw them. Filled by SlurmLauncher, read by SweepProgress."""

    def __init__(self) -> None:
        self.jobs: dict[int, Any] = {}
        self.watcher: Any = None
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self.jobs)

    def clear(self) -> None:
        self.jobs = {}

    def add(self, nums: list[int], jobs: list[Any], watcher: Any) -> None:
        self.watcher = watcher
        self.jobs.update(zip(nums, jobs))

    def refresh(self, older_than_s: float = 0.0) -> None:
        if self.watcher is None:
            return
        with self._lock:
            if time.time() - self.watcher._last_status_check >= older_than_s:
                self.watcher.update()

    def states(self) -> dict[int, str]:
        if self.watcher is None:
            return {}
        return {num: slurm_state(self.watcher.get_info(job.job_id, mode="cache").get("State"))
                for num, job in self.jobs.items()}

    def requeued(self) -> int:
        if self.watcher is None:
            return 0
        return sum(1 for job in self.jobs.values() if self.watcher.restarts.get(job.job_id))

    def summary(self, refresh_s: float | None = None, final: bool = False) -> str:
        """`slurm 41: pending 2 · running 2 · completed 4 · requeued 1`"""
        try:
            if final:           # settle the tasks still completing (a few seconds at most)
                for _ in range(10):
                    self.refresh()
                    if not any(s in ("running", "completing", "unknown")
                               for s in self.states().values()):
                        break
                    time.sleep(1)
            elif refresh_s is not None:
                self.refresh(older_than_s=refresh_s)
            states = self.states()
        except Exception:  # noqa: BLE001 - a display
            states = {num: "unknown" for num in self.jobs}
        counts: dict[str, int] = {}
        for state in states.values():
            counts[state] = counts.get(state, 0) + 1
        order = [s for s in SLURM_ORDER if s in counts] + sorted(set(counts) - set(SLURM_ORDER))
        arrays = sorted({str(job.job_id).split("_")[0] for job in self.jobs.values()})
        text = " · ".join(f"{s} {counts[s]}" for s in order)
        requeued = self.requeued()
        if requeued:
            text += f" · requeued {requeued}"
        return f"slurm {','.join(arrays)}: {text}"


SLURM_JOBS = SlurmTasks()


class SlurmLauncher(_SubmititSlurmLauncher):
    """Hydra's submitit SLURM launcher (`hydra/launcher=slurm`), made to survive SLURM:

    * states: squeue where sacct has no accounting database (the watcher above), so a task
      that ended without a result is noticed, and no warning on every poll;
    * a task that ended without a result (time limit, scancel, node failure, OOM kill) does
      not fail the sweep: its record says what happened (`interrupted` when the run caught
      SIGTERM), and a task without a record counts as `error`; both are redone by a rerun;
    * a requeued task (preemption, `scontrol requeue`) is waited for: it runs again with
      SLURM_RESTART_COUNT set, and its record's `attempt` says so;
    * the progress line and the summary show the tasks' SLURM states.
    """

    def launch(self, job_overrides: Any, initial_job_idx: int) -> list:
        import submitit
        from hydra.core.singleton import Singleton
        from hydra.core.utils import filter_overrides
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
        from omegaconf import OmegaConf
        from submitit.slurm.slurm import SlurmJob

        assert self.config is not None and len(job_overrides) > 0
        watcher = SLURM_JOBS.watcher or _watcher_class()()
        SlurmJob.watcher = watcher          # every SLURM job of this process polls through it
        params = dict(self.params)
        executor = submitit.AutoExecutor(cluster="slurm", folder=params.pop("submitit_folder"),
                                         slurm_max_num_timeout=params.pop("max_num_timeout"))
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"slurm_{k}": v
                                      for k, v in params.items()})
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        log.info(f"Submitit 'slurm' sweep output dir : {sweep_dir}")
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        args = []
        for i, overrides in enumerate(job_overrides):
            num = initial_job_idx + i
            log.info(f"\t#{num} : {' '.join(filter_overrides(overrides))}")
            args.append((list(overrides), "hydra.sweep.dir", num, f"job_id_for_{num}",
                         Singleton.get_state()))
        jobs = executor.map_array(self, *zip(*args))
        nums = [a[2] for a in args]
        SLURM_JOBS.add(nums, jobs, watcher)
        _print(f"[bold]slurm:[/] array job {str(jobs[0].job_id).split('_')[0]}, "
               f"{len(jobs)} tasks; logs in {jobs[0].paths.folder.parent}")
        return [self._collect(job, a[0], a[2]) for job, a in zip(jobs, args)]

    def _collect(self, job: Any, overrides: list[str], num: int) -> Any:
        from submitit.core.utils import UncompletedJobError

        job.wait()
        state = slurm_state(job.watcher.get_state(job.job_id, mode="cache"))
        if state in ENDED_EARLY and not job.paths.result_pickle.exists():
            job._results_timeout_s = 3   # a task that ended so wrote no result; don't wait 15 s
        try:
            return job.results()[0]
        except UncompletedJobError as e:    # no result: the record, if any, says what happened
            return self._from_record(job, overrides, num, state, e)

    def _from_record(self, job: Any, overrides: list[str], num: int, state: str,
                     error: Exception) -> Any:
        from hydra.core.utils import JobReturn, JobStatus
        from omegaconf import open_dict

        assert self.hydra_context is not None and self.config is not None
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(cfg.hydra.job):
            cfg.hydra.job.num = num
            cfg.hydra.job.id = job.job_id
        run_dir = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
        try:
            record = json.loads((run_dir / RECORD_NAME).read_text())
        except (OSError, ValueError):
            record = {}
        status = record.get("status") if record.get("status") in OUTCOMES else "error"
        why = f"SLURM {state}, task {job.job_id}"
        if not record:
            why += f", no record; log: {job.paths.stderr}"
            first = str(error).strip().splitlines()
            print(f"warning: cell #{num} ({job.job_id}) ended {state} without a record: "
                  f"{first[0] if first else error}", file=sys.stderr)
        for progress in _ACTIVE:
            progress.note(num, status, record.get("wall_time_s"), why)
        task_cfg = cfg.copy()
        with open_dict(task_cfg):
            hydra_cfg = task_cfg.pop("hydra")
        return JobReturn(overrides=list(overrides), cfg=task_cfg, hydra_cfg=hydra_cfg,
                         working_dir=str(run_dir), task_name=str(hydra_cfg.job.name),
                         status=JobStatus.COMPLETED, _return_value=status)
