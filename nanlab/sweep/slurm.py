"""SLURM as a sweep sees it: the tasks' job states, read from `squeue` where `sacct` has no
accounting database, and the tasks of this process's sweep.

Used by the SLURM launcher (hydra_plugins/nanlab/slurm_launcher.py: `hydra/launcher=slurm`,
`slurm_local`), which submits the cells and registers their tasks in `SLURM_JOBS`, and by the
progress callback (nanlab/sweep/progress.py), which shows their states in its progress line and summary
(`slurm 41: pending 2 · running 2 · completed 4`). Plain Python: submitit is imported only
when a SLURM sweep polls its first state.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

# --- states -----------------------------------------------------------------------------

# SLURM's job states (squeue --Format=State, sacct -o State), as the progress line names them
SLURM_STATE_NAMES = {
    "PENDING": "pending",
    "CONFIGURING": "pending",
    "REQUEUED": "requeued",
    "REQUEUE_HOLD": "requeued",
    "REQUEUE_FED": "requeued",
    "RESIZING": "running",
    "RUNNING": "running",
    "COMPLETING": "completing",
    "STAGE_OUT": "completing",
    "SUSPENDED": "suspended",
    "STOPPED": "suspended",
    "SIGNALING": "running",
    "COMPLETED": "completed",
    "TIMEOUT": "timeout",
    "CANCELLED": "cancelled",
    "FAILED": "failed",
    "NODE_FAIL": "node_fail",
    "OUT_OF_MEMORY": "out_of_memory",
    "PREEMPTED": "preempted",
    "BOOT_FAIL": "boot_fail",
    "DEADLINE": "deadline",
    "REVOKED": "revoked",
    "SPECIAL_EXIT": "special_exit",
}
# in display order; `gone`: no longer known to squeue (finished longer than MinJobAge ago)
SLURM_ORDER = (
    "pending",
    "requeued",
    "running",
    "completing",
    "suspended",
    "completed",
    "timeout",
    "cancelled",
    "failed",
    "out_of_memory",
    "node_fail",
    "preempted",
    "boot_fail",
    "deadline",
    "revoked",
    "special_exit",
    "gone",
    "unknown",
)
# ended, and not by finishing: a task in one of these wrote no result (src.train stops with
# SystemExit after writing an `interrupted` record), so waiting for one is pointless
ENDED_EARLY = {
    "timeout",
    "cancelled",
    "failed",
    "out_of_memory",
    "node_fail",
    "preempted",
    "boot_fail",
    "deadline",
    "revoked",
    "gone",
}


def slurm_state(raw: str | None) -> str:
    """`CANCELLED by 0` -> cancelled, `RUNNING` -> running, None -> unknown."""
    word = (raw or "").split(" ")[0].rstrip("+").upper()
    return SLURM_STATE_NAMES.get(word, word.lower() or "unknown")


# --- where the states come from --------------------------------------------------------


def accounting_works() -> bool:
    """Whether sacct answers here (it needs slurmdbd; a cluster without it says
    `Slurm accounting storage is disabled` and exits 1)."""
    try:
        proc = subprocess.run(
            ["sacct", "--noheader", "-X", "-j", "1", "-o", "JobID"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
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
            continue  # the header, or an empty line
        job_id = cols[0]
        if job_id.split("_")[0] in wanted:
            info[job_id] = {
                "JobID": job_id,
                "State": cols[1],
                "RestartCnt": cols[2],
                "NodeList": cols[3] if len(cols) > 3 else "",
            }
    return info


def make_watcher() -> Any:
    """A submitit SLURM watcher that asks squeue where sacct has no database (its class is
    defined on first use: submitit is imported only when a SLURM sweep runs)."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    class SlurmStates(SlurmInfoWatcher):
        def __init__(self, delay_s: int = 30) -> None:
            super().__init__(delay_s=delay_s)
            self.source: str | None = None  # "sacct" or "squeue", decided on first use
            self.restarts: dict[str, int] = {}  # job id -> times SLURM requeued it
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
            return [
                "squeue",
                "--array",
                "--states=all",
                f"--user={_user()}",
                "--Format=JobArrayID:|,State:|,RestartCnt:|,NodeList:|",
            ]

        def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
            if self.source != "squeue":
                info = super().read_info(string)
            else:
                text = string.decode() if isinstance(string, bytes) else string
                pending = self._registered - self._finished
                info = squeue_info(text, {x.split("_")[0] for x in pending})
                if text.strip():  # squeue answered: what it does not list has ended
                    for job_id in pending - set(info):
                        info[job_id] = {"JobID": job_id, "State": "GONE"}
            for job_id, row in info.items():
                state = slurm_state(row.get("State"))
                count = int(row["RestartCnt"]) if str(row.get("RestartCnt", "")).isdigit() else 0
                if state == "running":
                    self._was_running.add(job_id)
                elif state in ("pending", "requeued") and job_id in self._was_running:
                    count = max(count, self.restarts.get(job_id, 0) + 1)  # seen requeued
                    self._was_running.discard(job_id)
                self.restarts[job_id] = max(self.restarts.get(job_id, 0), count)
            return info

    return SlurmStates()


def _user() -> str:
    import getpass

    return getpass.getuser()


# --- this sweep's tasks -----------------------------------------------------------------


class SlurmTasks:
    """The SLURM tasks of this process's sweep: job num -> submitit job, and their states as
    the watcher last saw them. Filled by the launcher (hydra_plugins/nanlab/slurm_launcher.py),
    read by the progress callback (nanlab.sweep.progress.SweepProgress)."""

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
        return {
            num: slurm_state(self.watcher.get_info(job.job_id, mode="cache").get("State"))
            for num, job in self.jobs.items()
        }

    def requeued(self) -> int:
        if self.watcher is None:
            return 0
        return sum(1 for job in self.jobs.values() if self.watcher.restarts.get(job.job_id))

    def summary(self, refresh_s: float | None = None, final: bool = False) -> str:
        """`slurm 41: pending 2 · running 2 · completed 4 · requeued 1`"""
        try:
            if final:  # settle the tasks still completing (a few seconds at most)
                for _ in range(10):
                    self.refresh()
                    if not any(
                        s in ("running", "completing", "unknown") for s in self.states().values()
                    ):
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


# one sweep per process at a time: the progress callback clears it when a multirun starts
SLURM_JOBS = SlurmTasks()
