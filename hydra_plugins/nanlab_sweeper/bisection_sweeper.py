"""`hydra/sweeper=bisection`: the stable-lr frontier by bisection, as a Hydra sweeper.

For every combination of `params` (precision x softmax x mitigation, expanded as Hydra's basic
sweeper expands them, command-line sweeps included) it bisects `key` (`lr_x`) on a log scale
between `lo` and `hi` with the search in bisection.py (next to this file; the rounds, the
brackets and what counts as stable are explained there).

Each round is one batch through the configured launcher: the probe of every combination still
open, times the seeds, so joblib / submitit / SLURM run them side by side. Every probe is an
ordinary run of the entry point (`key=<value> seed=<s>` added to the combination's overrides)
with its own `record.json`, so `python -m src.report` reads them like any other sweep. A probe
whose record already exists in the sweep dir is skipped by src.train (`skipped`); its status is
then read from that record, so running the same sweep again costs no training and gives the
same frontier (`force=true` reruns everything).

At the end `<sweep dir>/frontier_bisection.json` and `.csv` give per combination the bracket,
the largest stable value, the probes with their statuses and record paths, the runs used and
the runs a dense grid of the same resolution would take ((2^steps + 1) points x seeds), and one
line per combination is printed. The progress callback (nanlab/sweep/progress.py) shows no total for this
sweeper: how many runs it takes depends on what the runs do (at most (2 + steps) x seeds per
combination).

Hydra plugins are imported on discovery, so nothing heavy is imported at module level.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.plugins.sweeper import Sweeper

from hydra_plugins.nanlab_sweeper.bisection import (
    ABOVE,
    BELOW,
    STABLE_IF,
    Bisection,
    bisect_all,
    fmt,
)

log = logging.getLogger(__name__)
OUT_NAME = "frontier_bisection"


def summary_line(label: str, key: str, result: dict) -> str:
    """The line printed per combination: where its frontier lies, and the runs it took."""
    lo, hi = result["largest_stable"], result["smallest_unstable"]
    if result["outcome"] == BELOW:
        where = f"unstable already at {key}={fmt(hi)} (frontier below the range)"
    elif result["outcome"] == ABOVE:
        where = f"stable up to {key}={fmt(lo)} (frontier above the range)"
    else:
        where = f"largest stable {key}={fmt(lo)}, unstable at {fmt(hi)}"
    share = result["runs"] / result["dense_runs"]
    return (
        f"frontier {label}: {where} │ {result['runs']} runs vs {result['dense_runs']} "
        f"dense ({share:.0%})"
    )


class BisectionSweeper(Sweeper):
    """`hydra/sweeper=bisection` (conf/hydra/sweeper/bisection.yaml); see the module doc."""

    def __init__(
        self,
        params: dict | None = None,
        key: str = "lr_x",
        lo: float = 0.03,
        hi: float = 30.0,
        steps: int = 4,
        seeds: Sequence = (0,),
        stable_if: Sequence[str] = STABLE_IF,
        digits: int = 4,
        max_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.params = dict(params or {})
        self.key = str(key)
        self.lo, self.hi, self.steps = float(lo), float(hi), int(steps)
        self.seeds = list(seeds)
        self.stable_if = tuple(stable_if)
        self.digits = int(digits)
        self.max_batch_size = max_batch_size
        Bisection(self.lo, self.hi, self.steps, tuple(self.seeds))  # checks the settings
        self.hydra_context = None
        self.config = None
        self.launcher = None
        self.job_idx = 0
        self.searches: list[Bisection] = []
        self.combinations: list[list[str]] = []
        self.probes: dict[tuple[int, float, Any], dict] = {}  # (search, value, seed) -> run

    def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    # --- the combinations ---------------------------------------------------------------

    def split_combinations(self, arguments: list[str]) -> tuple[list[list[str]], list[str]]:
        """`params` and the command line, expanded as the basic sweeper does; and the keys
        that vary (params' keys and command-line sweeps), which name a combination."""
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra.errors import HydraException

        from nanlab.sweep.basic import split_arguments

        lines = [f"{k}={v}" for k, v in self.params.items()] + list(arguments)
        loader = self.hydra_context.config_loader if self.hydra_context else None
        overrides = OverridesParser.create(config_loader=loader).parse_overrides(lines)
        for o in overrides:
            if o.get_key_element().lstrip("+~") in (self.key, "seed"):
                raise HydraException(
                    f"{o.input_line}: the bisection sweeper sets {self.key} and seed itself "
                    f"(hydra.sweeper.lo/hi/steps/seeds); leave them out of params and the "
                    f"command line"
                )
        axes = [
            o.get_key_element()
            for o in overrides
            if o.is_sweep_override() or o.get_key_element() in self.params
        ]
        return split_arguments(overrides)[0], axes

    # --- the sweep ----------------------------------------------------------------------

    def sweep(self, arguments: list[str]) -> Any:
        from omegaconf import OmegaConf

        assert self.config is not None and self.launcher is not None
        self.combinations, axes = self.split_combinations(arguments)
        self.searches = [
            Bisection(self.lo, self.hi, self.steps, tuple(self.seeds), self.stable_if, self.digits)
            for _ in self.combinations
        ]
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        log.info(
            f"bisection of {self.key} in [{fmt(self.lo)}, {fmt(self.hi)}], {self.steps} "
            f"steps, seeds {self.seeds}: {len(self.combinations)} combinations"
        )
        returns: list = []

        def evaluate(batch: list[tuple[int, float, Any]]) -> list[str]:
            jobs = [
                [*self.combinations[k], f"{self.key}={fmt(x)}", f"seed={s}"] for k, x, s in batch
            ]
            self.validate_batch_is_legal(jobs)
            size = self.max_batch_size or len(jobs)
            results = []
            for start in range(0, len(jobs), size):
                chunk = jobs[start : start + size]
                self.job_idx = free_job_idx(sweep_dir, chunk, self.job_idx)
                got = self.launcher.launch(chunk, initial_job_idx=self.job_idx)
                self.job_idx += len(chunk)
                results += list(got)
                returns.append(got)
            statuses = []
            for probe, result in zip(batch, results):
                status, record = self._outcome(result, sweep_dir)
                self.probes[probe] = {"status": status, "record": record}
                statuses.append(status)
            return statuses

        def on_round(number: int, runs: int, still_open: int) -> None:
            log.info(f"bisection round {number}: {runs} runs for {still_open} combinations")

        rounds = bisect_all(self.searches, evaluate, on_round)
        self.write(sweep_dir, axes, rounds)
        return returns

    def _outcome(self, result: Any, sweep_dir: Path) -> tuple[str, str | None]:
        """A probe's status and its record: the job's return value (src.train.hydra_job
        returns the record's status), or for a probe done earlier (`skipped`) the status of
        the record it found; a job that raised is an `error`."""
        from hydra.core.utils import JobStatus

        run_dir = _output_dir(result)
        record = str(Path(run_dir) / "record.json") if run_dir else None
        if getattr(result, "status", None) == JobStatus.FAILED:
            log.warning(f"probe {run_dir} failed: {getattr(result, '_return_value', '')}")
            return "error", record
        value = getattr(result, "_return_value", None)
        if value == "skipped":
            return self._done_status(result, sweep_dir)
        if not isinstance(value, str):
            return "error", record
        return value, record

    @staticmethod
    def _done_status(result: Any, sweep_dir: Path) -> tuple[str, str | None]:
        from omegaconf import OmegaConf

        from nanlab.config.compose import config_hash
        from nanlab.record import find_done, read_record

        try:
            plain = OmegaConf.to_container(result.cfg, resolve=True)
            path = find_done(sweep_dir, config_hash(plain))
        except Exception as e:  # noqa: BLE001 - an unreadable probe is an error, not a crash
            log.warning(f"skipped probe {_output_dir(result)}: {e}")
            path = None
        if path is None:
            return "error", None
        return read_record(path).status, str(path)

    # --- the outputs --------------------------------------------------------------------

    def results(self, axes: list[str], sweep_dir: Path) -> list[dict]:
        """Per combination: its overrides, its axes' values, the search's result, and each
        probe's records (relative to the sweep dir where they lie in it)."""
        out = []
        for k, (combo, search) in enumerate(zip(self.combinations, self.searches)):
            named = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in combo}
            label = " ".join(f"{a}={named[a]}" for a in axes if a in named) or "(all)"
            result = search.result()
            for probe in result["probes"]:
                for seed in search.seeds:
                    run = self.probes.get((k, probe["value"], seed), {})
                    probe.setdefault("records", {})[str(seed)] = _relative(
                        run.get("record"), sweep_dir
                    )
            out.append(
                {
                    "combination": label,
                    "overrides": list(combo),
                    **{a: named.get(a) for a in axes},
                    **result,
                }
            )
        return out

    def write(self, sweep_dir: Path, axes: list[str], rounds: int) -> dict:
        results = self.results(axes, sweep_dir)
        total = sum(r["runs"] for r in results)
        dense = sum(r["dense_runs"] for r in results)
        doc = {
            "key": self.key,
            "lo": self.lo,
            "hi": self.hi,
            "steps": self.steps,
            "seeds": self.seeds,
            "stable_if": list(self.stable_if),
            "resolution": (self.hi / self.lo) ** (1 / 2**self.steps),
            "rounds": rounds,
            "runs": total,
            "dense_runs": dense,
            "dense_grid": f"(2^{self.steps} + 1) points x {len(self.seeds)} seeds per combination",
            "combinations": results,
        }
        _write_atomic(sweep_dir / f"{OUT_NAME}.json", json.dumps(doc, indent=2))
        columns = [
            "combination",
            *axes,
            "outcome",
            "largest_stable",
            "smallest_unstable",
            "bracket_ratio",
            "points",
            "runs",
            "dense_runs",
        ]
        tmp = sweep_dir / f".{OUT_NAME}.csv.{os.getpid()}.tmp"
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            for r in results:
                writer.writerow({c: "" if r.get(c) is None else r.get(c) for c in columns})
        os.replace(tmp, sweep_dir / f"{OUT_NAME}.csv")
        for r in results:
            print(summary_line(r["combination"], self.key, r), flush=True)
        share = f" ({total / dense:.0%})" if dense else ""
        print(
            f"bisection: {len(results)} combination{'s' * (len(results) != 1)}, {total} runs in {rounds} rounds vs "
            f"{dense} for a dense grid of the same resolution{share}: "
            f"{sweep_dir / OUT_NAME}.json",
            flush=True,
        )
        return doc


def free_job_idx(sweep_dir: Path, jobs: list[list[str]], start: int) -> int:
    """The first job number for `jobs`: `start`, unless a run dir `<sweep dir>/<num>` it
    would use holds the record of another run (a rerun whose searches went another way, e.g.
    after an `error` probe was redone, or other lo/hi/steps); then past the highest numbered
    dir, so that no record is overwritten. The same sweep run again reuses its own dirs."""
    for i, job in enumerate(jobs):
        path = sweep_dir / str(start + i) / "record.json"
        try:
            overrides = json.loads(path.read_text()).get("overrides") or []
        except (OSError, ValueError, AttributeError):
            continue
        if sorted(overrides) != sorted(job):
            numbered = [int(p.name) for p in sweep_dir.iterdir() if p.name.isdigit()]
            return max([start - 1, *numbered]) + 1
    return start


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _output_dir(result: Any) -> str | None:
    """A job's output dir (its record's folder): hydra.runtime.output_dir of its hydra config
    (the whole config from Hydra's launchers, the hydra node alone from the SLURM launcher's
    collector in hydra_plugins/nanlab, which also sets working_dir to it)."""
    from omegaconf import OmegaConf

    cfg = getattr(result, "hydra_cfg", None)
    for key in ("hydra.runtime.output_dir", "runtime.output_dir"):
        try:
            value = OmegaConf.select(cfg, key, default=None) if cfg is not None else None
        except Exception:  # noqa: BLE001, S112 - not a config: try the next
            continue
        if value:
            return str(value)
    return getattr(result, "working_dir", None)


def _relative(path: str | None, root: Path) -> str | None:
    if not path:
        return None
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return path
