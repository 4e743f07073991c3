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

SLURM (`hydra/launcher=slurm`, `slurm_local`) goes through the launcher in
hydra_plugins/nanlab/slurm_launcher.py, Hydra's submitit launcher with three changes: job
states come from `squeue` where `sacct` has no accounting database (submitit polls sacct only,
and warned on every poll); a task that ended without a result (time limit, scancel, node
failure) is collected from its record instead of failing the whole sweep, and reported here
through `note`; and the progress line and the summary show the tasks' SLURM states (pending,
running, requeued, completed, timeout, ...), which nanlab/sweep/slurm.py keeps.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from nanlab.record import RECORD_NAME, STATUSES, read_record
from nanlab.sweep.slurm import SLURM_JOBS

OUTCOMES = (*STATUSES, "skipped")  # ok, ..., interrupted, error, skipped
STYLE = {
    "ok": "green",
    "stalled": "cyan",
    "nonfinite": "bold red",
    "diverged": "yellow",
    "interrupted": "blue",
    "error": "magenta",
    "skipped": "dim",
}
PROGRESS_DIR = ".progress"
# this process's sweep callback (the submitting one): the SLURM launcher tells it about cells
# whose worker could not report itself
ACTIVE_PROGRESS: list[SweepProgress] = []


def grid_size(config: Any) -> int | None:
    """How many cells the sweep has: `hydra.sweeper.params` x the command line's sweeps,
    exactly as the configured sweeper expands them (Hydra's BasicSweeper or a subclass, such
    as the map's mechanism sweeper). None for other sweepers (unless they say `n_trials`) or
    when the overrides cannot be parsed here."""
    try:
        sweeper = config.hydra.sweeper
        if sweeper.get("n_trials"):
            return int(sweeper.get("n_trials"))
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra.utils import get_class
        from omegaconf import OmegaConf

        cls: Any = get_class(str(sweeper.get("_target_", "")))
        from nanlab.sweep.basic import basic_sweeper

        if not issubclass(cls, basic_sweeper()):
            return None
        kwargs = dict(OmegaConf.to_container(sweeper, resolve=True))  # type: ignore[arg-type]
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
        status = read_record(Path(str(out)) / RECORD_NAME).status if out else None
    except (OSError, ValueError, AttributeError, TypeError):
        status = None
    return status if status in OUTCOMES else "error"


def cell_brief(config: Any, status: str) -> str:
    """What a cell ran and how it ended, in a few words, from its overrides and record:
    the sweep's one line per cell (the job itself prints nothing in a multirun)."""
    try:
        task = [
            o
            for o in _select(config, "hydra.overrides.task", []) or []
            if not str(o).startswith(("hydra.", "experiment="))
        ]
        out = _select(config, "hydra.runtime.output_dir", "")
        why = read_record(Path(str(out)) / RECORD_NAME).brief() if status != "skipped" else ""
    except (OSError, ValueError, TypeError):
        return ""
    return (f" {why}" if why else "") + (f" · {' '.join(map(str, task))}" if task else "")


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


def progress_line(
    done: int,
    total: int | None,
    counts: dict[str, int],
    elapsed: float | None,
    left: float | None,
    markup: bool = True,
    slurm: str = "",
) -> str:
    """`sweep 3/8 (38%) │ ok 2 · nonfinite 1 · … │ 1m02s elapsed, ~1m40s left`; with SLURM,
    the tasks' states before the time: `│ slurm 41: pending 2 · running 2 · completed 4`"""
    of = f"/{total} ({100 * done / total:.0f}%)" if total else ""
    when = f"{fmt_duration(elapsed)} elapsed" if elapsed is not None else ""
    if total is not None and done >= total:
        when += ", finished"
    elif left is not None:
        when += f", ~{fmt_duration(left)} left"
    head = f"[bold]sweep {done}{of}[/]" if markup else f"sweep {done}{of}"
    return (
        f"{head} │ {counts_text(counts, markup)}"
        + (f" │ {slurm}" if slurm else "")
        + (f" │ {when}" if when else "")
    )


def counts_text(counts: dict[str, int], markup: bool = True) -> str:
    """`ok 2 · nonfinite 1 · diverged 0 · error 0 · skipped 0`, coloured where non-zero."""
    parts = []
    for name in OUTCOMES:
        text = f"{name} {counts.get(name, 0)}"
        style = STYLE.get(name, "bold")
        parts.append(f"[{style}]{text}[/]" if markup and counts.get(name) else text)
    return " · ".join(parts)


def print_markup(text: str) -> None:
    """Prints rich markup (`[bold]sweep:[/] ...`), as plain text where rich cannot."""
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

    def __init__(
        self, enabled: bool = True, keep_markers: bool = False, poll_s: float = 15.0
    ) -> None:
        self.enabled = enabled
        self.keep_markers = keep_markers
        self.poll_s = poll_s
        self.t0: float | None = None
        self.total: int | None = None
        self.sweep_dir: Path | None = None
        self.session: str | None = None
        self.launcher = ""
        self.seen: dict[int, dict] = {}  # what this process saw: job num -> marker
        self._job_t0: float | None = None
        self._stop: threading.Event | None = None  # the submitit poller, this process only

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
            ACTIVE_PROGRESS[:] = [self]
            SLURM_JOBS.clear()
            cells = f"{self.total} cells" if self.total is not None else "cells"
            print_markup(f"[bold]sweep:[/] {cells} → {self.sweep_dir} ({self.launcher})")
            if ("submitit" in target or "slurm" in target.lower()) and self.poll_s > 0:
                self._stop = threading.Event()
                threading.Thread(
                    target=self._poll, args=(self._stop,), daemon=True, name="sweep-progress"
                ).start()
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
                    print_markup(self._status_line(slurm))
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
            cell = f"[{STYLE.get(status, '')}]{status}[/]{cell_brief(config, status)}"
            print_markup(f"cell #{num} {cell} ({fmt_duration(took)}) │ {self._status_line()}")
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
        print_markup(f"cell #{num} {cell}{f' ({why})' if why else ''} │ {self._status_line()}")

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
            lines = [
                f"{of} cells{took}",
                counts_text(counts),
                f"records: {sweep_dir}",
                f"report:  python -m src.report {sweep_dir}",
            ]
            if SLURM_JOBS:
                lines.insert(2, SLURM_JOBS.summary(final=True))
            try:
                from rich.console import Console
                from rich.panel import Panel

                # wide enough for its longest line: a panel wrapped at a pipe's 80 columns
                # prints a line twice as long as the summary is
                width = max(len(line) for line in lines) + 4
                Console(highlight=False, width=max(width, 80)).print(
                    Panel("\n".join(lines), title="sweep done", expand=False)
                )
            except Exception:  # noqa: BLE001
                print_markup("sweep done: " + "; ".join(lines))
            ACTIVE_PROGRESS.clear()
            session_dir = self._session_dir()
            if not self.keep_markers and session_dir is not None:
                shutil.rmtree(session_dir, ignore_errors=True)
                try:
                    session_dir.parent.rmdir()  # only when no other session is left
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
        if folder is None:  # on_multirun_start did not run for this object
            return
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{marker['num']}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(marker))
            os.replace(tmp, folder / f"{marker['num']}.json")
        except OSError:
            pass  # read-only or vanished: fall back to what this process saw

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
