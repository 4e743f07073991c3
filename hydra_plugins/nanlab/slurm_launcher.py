"""nanlab's SLURM launcher (`hydra/launcher=slurm`, `slurm_local`): Hydra's submitit SLURM
launcher, made to survive SLURM.

It lives here because Hydra instantiates a launcher only from the `hydra_plugins` namespace.
It imports src (the job states in nanlab/sweep/slurm.py, the progress callback in nanlab/sweep/progress.py), so it
is found when the repository root is on sys.path, as it is for `python -m src.train` there
(make, the tests) and in the SLURM jobs, which start in the directory the sweep was submitted
from. Hydra imports every plugin module on discovery: submitit itself is imported only when a
sweep launches.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import (
    SlurmLauncher as _SubmititSlurmLauncher,
)

from nanlab.record import RECORD_NAME, read_record
from nanlab.sweep.progress import ACTIVE_PROGRESS, OUTCOMES, print_markup
from nanlab.sweep.slurm import ENDED_EARLY, SLURM_JOBS, make_watcher, slurm_state

log = logging.getLogger(__name__)


class SlurmLauncher(_SubmititSlurmLauncher):
    """Hydra's submitit SLURM launcher (`hydra/launcher=slurm`), made to survive SLURM:

    * states: squeue where sacct has no accounting database (nanlab.sweep.slurm's watcher), so a task
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
        watcher = SLURM_JOBS.watcher or make_watcher()
        SlurmJob.watcher = watcher  # every SLURM job of this process polls through it
        params = dict(self.params)
        executor = submitit.AutoExecutor(
            cluster="slurm",
            folder=params.pop("submitit_folder"),
            slurm_max_num_timeout=params.pop("max_num_timeout"),
        )
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{k if k in base else f"slurm_{k}": v for k, v in params.items()}
        )
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        log.info(f"Submitit 'slurm' sweep output dir : {sweep_dir}")
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        args = []
        for i, overrides in enumerate(job_overrides):
            num = initial_job_idx + i
            log.info(f"\t#{num} : {' '.join(filter_overrides(overrides))}")
            args.append(
                (
                    list(overrides),
                    "hydra.sweep.dir",
                    num,
                    f"job_id_for_{num}",
                    Singleton.get_state(),
                )
            )
        jobs = executor.map_array(self, *zip(*args))
        nums = [a[2] for a in args]
        SLURM_JOBS.add(nums, jobs, watcher)
        print_markup(
            f"[bold]slurm:[/] array job {str(jobs[0].job_id).split('_')[0]}, "
            f"{len(jobs)} tasks; logs in {jobs[0].paths.folder.parent}"
        )
        return [self._collect(job, a[0], a[2]) for job, a in zip(jobs, args)]

    def _collect(self, job: Any, overrides: list[str], num: int) -> Any:
        from submitit.core.utils import UncompletedJobError

        job.wait()
        state = slurm_state(job.watcher.get_state(job.job_id, mode="cache"))
        if state in ENDED_EARLY and not job.paths.result_pickle.exists():
            job._results_timeout_s = 3  # a task that ended so wrote no result; don't wait 15 s
        try:
            return job.results()[0]
        except UncompletedJobError as e:  # no result: the record, if any, says what happened
            return self._from_record(job, overrides, num, state, e)

    def _from_record(
        self, job: Any, overrides: list[str], num: int, state: str, error: Exception
    ) -> Any:
        from hydra.core.utils import JobReturn, JobStatus
        from omegaconf import open_dict

        assert self.hydra_context is not None and self.config is not None
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(cfg.hydra.job):
            cfg.hydra.job.num = num
            cfg.hydra.job.id = job.job_id
        run_dir = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
        try:
            record = dataclasses.asdict(read_record(run_dir / RECORD_NAME))
        except (OSError, ValueError, TypeError):
            record = {}
        status = record.get("status") if record.get("status") in OUTCOMES else "error"
        why = f"SLURM {state}, task {job.job_id}"
        if not record:
            why += f", no record; log: {job.paths.stderr}"
            first = str(error).strip().splitlines()
            print(
                f"warning: cell #{num} ({job.job_id}) ended {state} without a record: "
                f"{first[0] if first else error}",
                file=sys.stderr,
            )
        for progress in ACTIVE_PROGRESS:
            progress.note(num, status, record.get("wall_time_s"), why)
        task_cfg = cfg.copy()
        with open_dict(task_cfg):
            hydra_cfg = task_cfg.pop("hydra")
        return JobReturn(
            overrides=list(overrides),
            cfg=task_cfg,
            hydra_cfg=hydra_cfg,
            working_dir=str(run_dir),
            task_name=str(hydra_cfg.job.name),
            status=JobStatus.COMPLETED,
            _return_value=status,
        )
