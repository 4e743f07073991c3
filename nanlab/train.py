"""The Hydra entry point: command line -> config -> specs -> run -> one outcome record.

    python -m src.train precision=bf16 softmax=stable -m lr=1e-5,5e-5

Only this file (and the other entry points) sees Hydra: nanlab/config/compose.py turns the composed
config into the typed specs of nanlab/config/specs.py and nanlab/run/runner.py runs them. A bad option is
refused by `validate_cli` before Hydra composes and before torch loads.
"""

from __future__ import annotations

import math
import signal
import sys
from pathlib import Path

import nanlab  # noqa: F401  (sets the offline environment before anything else loads)
from nanlab.config.compose import CONF_DIR, spec_from_config, validate_cli
from nanlab.record import RECORD_NAME, Record, find_done, read_record, write_record

LAST_STATUS: list[str] = []


def hydra_job(cfg) -> str:
    from hydra.core.hydra_config import HydraConfig

    from nanlab.run.runner import Interrupted, main_thread, raise_interrupted

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    overrides = list(hc.overrides.task)
    if main_thread():
        # from the job's first line, not only inside run(): submitit ignores SIGTERM until
        # the task starts, and a time limit in these seconds would leave no record
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, raise_interrupted)
    try:
        return _job(cfg, hc, run_dir, overrides)
    except Interrupted as e:  # before run() took over: still one record, then stop
        if not _recorded_this_attempt(run_dir):  # a second SIGTERM after run() wrote its own
            write_record(
                Record(
                    status="interrupted", signal=str(e), overrides=overrides, run_dir=str(run_dir)
                ),
                run_dir,
            )
        raise SystemExit(128 + e.signum) from None


def _recorded_this_attempt(run_dir: Path) -> bool:
    """run() already wrote this attempt's record (SLURM sends SIGTERM again while the task
    winds down: the second one lands here and must not overwrite the full record)."""
    import os

    path = run_dir / RECORD_NAME
    if not path.exists():
        return False
    try:
        rec = read_record(path)
    except (OSError, ValueError, TypeError):
        return False
    attempt = int(os.environ.get("SLURM_RESTART_COUNT") or 0) + 1
    return rec.attempt == attempt and rec.max_steps > 0


def _job(cfg, hc, run_dir: Path, overrides: list[str]) -> str:
    from omegaconf import OmegaConf

    multirun = hc.mode.name == "MULTIRUN"
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        spec = spec_from_config(resolved, overrides, multirun)  # type: ignore[arg-type]
    except Exception as e:  # noqa: BLE001 - a bad cell is a record, the sweep goes on
        record = Record(
            status="error",
            error=f"{type(e).__name__}: {e}",
            overrides=overrides,
            run_dir=str(run_dir),
        )
        for key in ("precision", "softmax", "stress", "guard"):
            setattr(record, key, str(OmegaConf.select(cfg, f"{key}.name", default="")))
        record.lr = float(cfg.get("lr")) if isinstance(cfg.get("lr"), (int, float)) else math.nan
        record.seed = int(cfg.get("seed", 0))
        write_record(record, run_dir)
        if not multirun:  # a sweep's cell line (nanlab/sweep/progress.py) says it
            print(f"error: {e}", file=sys.stderr)
        LAST_STATUS.append("error")
        return "error"
    if multirun and not cfg.get("force", False):
        done = find_done(Path(hc.sweep.dir), spec.config_hash)
        if done is not None:
            if spec.trainer.verbose:
                print(f"skip: this cell is done already ({done}); force=true reruns it")
            LAST_STATUS.append("skipped")
            return "skipped"
    from nanlab.run.runner import run  # torch, transformers and Lightning load here, not before

    record = run(spec, run_dir)
    if not multirun or spec.trainer.verbose:  # a sweep prints one line per cell instead
        print(record.verdict())
    LAST_STATUS.append(record.status)
    return record.status


def main() -> None:
    import hydra

    # argparse ends the overrides at the first option, so `python -m src.train a=1 -m b=1,2`
    # would fail: put -m/--multirun first.
    flags = [a for a in sys.argv[1:] if a in ("-m", "--multirun")]
    sys.argv[1:] = flags + [a for a in sys.argv[1:] if a not in ("-m", "--multirun")]
    problem = validate_cli(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(hydra_job)()
    multirun = any(a in ("-m", "--multirun") for a in sys.argv[1:])
    if not multirun and LAST_STATUS and LAST_STATUS[-1] == "error":
        sys.exit(1)


if __name__ == "__main__":
    main()
