"""One run, plain Python: specs -> parts (nanlab/run/build.py) -> Lightning fit -> one outcome record.

`run(spec, run_dir)` is what `python -m src.train` calls for every cell, and what tests,
the benchmark and the replay call directly. It never raises for a failing run: every failure
is a record (status, cause, where), written to run_dir/record.json.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

from nanlab.config.specs import RunSpec
from nanlab.record import Record, write_record

log = logging.getLogger(__name__)

# Lightning notes that do not apply here: the module's batch hook is meant to win over the
# datamodule's; the pytree deprecation is Lightning's own.
warnings.filterwarnings("ignore", message=".*on_after_batch_transfer.*")
warnings.filterwarnings("ignore", message=".*LeafSpec.*")
warnings.filterwarnings("ignore", message=".*litlogger.*")
# where SLURM is installed, Lightning says on every Trainer that `srun` is available (twice):
# a run here is one process; SLURM sweeps launch through submitit, not srun
warnings.filterwarnings("ignore", message=".*`srun` command is available.*")
warnings.filterwarnings("ignore", message=".*dataloader is not resumable.*")


# --- one run ----------------------------------------------------------------------------


def _logger(spec: RunSpec, run_dir: Path):
    if spec.logger.name == "none":
        return False
    if spec.logger.name == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(run_dir), name="csv")
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    # mode goes to wandb.init directly: no WANDB_MODE env var leaks into later jobs.
    # silent: W&B's banner, run history and summary (~35 lines a run) stay in its run dir
    # (files/wandb-summary.json, the .wandb history, logs/); trainer.verbose=true prints them.
    logger = WandbLogger(
        save_dir=str(run_dir),
        project=spec.logger.project,
        entity=spec.logger.entity,
        mode=spec.logger.mode,
        name=run_dir.name,
        tags=list(spec.logger.tags),
        config=spec.config,
        settings=wandb.Settings(silent=not spec.trainer.verbose),
    )
    # Lightning passes anonymous=None, which W&B 0.2x+ warns about even when silent
    logger._wandb_init.pop("anonymous", None)
    return logger


def base_record(spec: RunSpec, run_dir: Path) -> Record:
    """The spec's record (Record.from_spec) and where it runs: versions and device."""
    import torch
    import transformers

    record = Record.from_spec(spec, run_dir)
    record.torch_version, record.transformers_version = (
        torch.__version__,
        transformers.__version__,
    )
    record.device = torch.cuda.get_device_name() if torch.cuda.is_available() else _cpu_name()
    return record


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "cpu: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return "cpu: " + (platform.processor() or platform.machine())


class Interrupted(BaseException):
    """SIGTERM (SLURM preemption or time limit) or SIGINT: the run stops and says so."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def raise_interrupted(signum, frame):
    raise Interrupted(signum)


def run(spec: RunSpec, run_dir: str | Path, extra_callbacks: list | None = None) -> Record:
    """Build everything, fit, and return the outcome record (also written to run_dir).
    `extra_callbacks` lets the benchmark time steps without touching the setup."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = base_record(spec, run_dir)
    started = time.time()
    interrupted: Interrupted | None = None
    # the trainer and logger as soon as they exist: an interrupt inside fit still needs them
    made: dict = {}
    # Lightning composes its own SIGTERM handler with this one (it calls both).
    previous = (
        {sig: signal.signal(sig, raise_interrupted) for sig in (signal.SIGTERM, signal.SIGINT)}
        if main_thread()
        else {}
    )
    try:
        with quiet(spec.multirun and not spec.trainer.verbose):
            _fit(spec, run_dir, record, extra_callbacks, made)
    except Interrupted as e:
        interrupted = e
        record.status, record.signal = "interrupted", str(e)
        record.steps_done = made["trainer"].global_step if "trainer" in made else 0
    except Exception as e:  # noqa: BLE001 - every failure becomes a record, never a crash
        record.status = "error"
        record.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        (run_dir / "error.txt").write_text(traceback.format_exc())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        record.wall_time_s = round(time.time() - started, 2)
        write_record(record, run_dir)
        _finish_logger(made.get("logger"), record)
    if interrupted is not None:  # the record is written: now stop as the signal asked
        print(record.verdict(), file=sys.stderr)
        raise SystemExit(128 + interrupted.signum)
    return record


def _fit(spec: RunSpec, run_dir: Path, record: Record, extra_callbacks, made: dict) -> None:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from nanlab.data.datamodule import NanDataModule
    from nanlab.diagnosis.monitor import build_callbacks
    from nanlab.diagnosis.regime import RegimeWatch
    from nanlab.run.build import build_parts, pick_device
    from nanlab.run.module import NanLabModule

    route_lightning_logs()
    L.seed_everything(spec.seed, workers=True, verbose=False)
    device = pick_device(spec.trainer.accelerator)
    if device == "cpu" and spec.trainer.cpu_threads:
        torch.set_num_threads(spec.trainer.cpu_threads)
    made_data: dict = {}

    def first_batch(parts):  # a weight-level mechanism calibrates on the first batch
        data = made_data["data"] = NanDataModule(
            spec.data, parts.processor, spec.batch_size, spec.seed
        )
        data.setup("fit")
        batch = next(iter(data.train_dataloader()))
        return parts.batch_transform(batch, 0) if parts.batch_transform else batch

    parts = build_parts(
        spec.model,
        spec.data,
        spec.softmax,
        spec.stress,
        spec.precision,
        spec.seed,
        device,
        first_batch,
    )
    data = made_data.get("data") or NanDataModule(
        spec.data, parts.processor, spec.batch_size, spec.seed
    )
    module = NanLabModule(parts.model, spec.optim, parts.lr_multiplier, parts.batch_transform)
    record.half_gemm = parts.half_gemm
    # the monitor before the guard: it must see the gradients skip_step drops (check_order)
    checks, monitor, guard = build_callbacks(spec.monitor, spec.guard, parts.model)
    # progressive's switch first: the monitor's snapshot of a step (for its replay) must see
    # the precision the step runs in, also at the switch step itself
    callbacks = [*parts.precision_callbacks, *checks, *(extra_callbacks or [])]
    # the regime at the first and last step (relative update size, attention logits and
    # entropy per tower): read-only, after the monitor and the guard
    regime = RegimeWatch(parts.model, spec.optim.max_steps - 1) if spec.monitor.enabled else None
    callbacks += [regime] if regime is not None else []
    logger = made["logger"] = _logger(spec, run_dir)
    if logger:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if spec.save.checkpoint:
        callbacks.append(
            ModelCheckpoint(
                dirpath=str(run_dir / "checkpoints"),
                save_last=True,
                every_n_train_steps=max(spec.optim.max_steps // 4, 1),
            )
        )
    bar = spec.trainer.progress and not spec.multirun  # a sweep shows cells done instead
    if bar:
        callbacks.append(steps_bar())
    val_every = spec.trainer.val_every
    trainer = made["trainer"] = L.Trainer(
        accelerator=device,
        devices=spec.trainer.devices,
        strategy=spec.trainer.strategy,
        plugins=[parts.plugin],
        max_steps=spec.optim.max_steps,
        callbacks=callbacks,
        logger=logger,
        default_root_dir=str(run_dir),
        gradient_clip_val=spec.optim.clip or None,
        gradient_clip_algorithm="norm",
        val_check_interval=val_every or None,
        check_val_every_n_epoch=None,
        limit_val_batches=1.0 if val_every else 0,
        num_sanity_val_steps=0,
        enable_checkpointing=spec.save.checkpoint,
        enable_progress_bar=bar,
        log_every_n_steps=spec.trainer.log_every,
        enable_model_summary=False,
    )
    if spec.logger.name == "wandb" and not spec.trainer.verbose:  # W&B prints it otherwise
        log.info("W&B run dir: %s (`wandb sync` uploads it)", logger.experiment.dir)
    trainer.fit(module, datamodule=data, ckpt_path=spec.ckpt_path)
    _fill_outcome(record, trainer, monitor, guard)
    if regime is not None:
        regime.fill(record)
    if monitor.failing_batch is not None:
        torch.save(dict(monitor.failing_batch.items()), run_dir / "failing_batch.pt")
    if spec.save.hf and record.status == "ok":
        from nanlab.model.checkpoint import save_pretrained

        save_pretrained(module.model, parts.processor, run_dir / "hf", spec.save.lora_merged)
    if spec.serve.enabled and record.status in ("ok", "stalled") and data.test:
        # the symptom users report: finite in training, NaN on some test samples served
        from nanlab.run.serve import serve_test

        for key, value in serve_test(
            module.model, parts.processor, data.test, spec.serve, spec.data, record.half_gemm
        ).items():
            setattr(record, key, value)
    _write_history(monitor, run_dir)


def steps_bar():
    """Lightning's Rich bar counting optimizer steps out of max_steps (Lightning's own counts
    batches per epoch under "Epoch 0/-2": max_epochs is -1 when max_steps ends the run)."""
    from lightning.pytorch.callbacks import RichProgressBar

    class StepsBar(RichProgressBar):
        @property
        def total_train_batches(self):
            return self.trainer.max_steps

        def _get_train_description(self, current_epoch: int) -> str:
            return "step"

        def on_train_epoch_start(self, trainer, pl_module):
            if self.train_progress_bar_id is None:  # one bar for the run, not one an epoch
                super().on_train_epoch_start(trainer, pl_module)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            self._update(self.train_progress_bar_id, trainer.global_step)
            self.refresh()

    return StepsBar()


def route_lightning_logs() -> None:
    """Lightning's INFO lines ("GPU available", the litlogger tip, "`Trainer.fit` stopped")
    go to the `lightning` logger's own console handler and, propagated, to Hydra's console
    again: printed twice. Where the root logger has handlers (Hydra's job logging: the job's
    log file, a console for warnings), drop Lightning's own console so they go there once."""
    import lightning  # noqa: F401  (its import adds the handler: first)

    if not logging.getLogger().hasHandlers():
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric"):
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if type(h) is logging.StreamHandler:  # a console, not a file
                lg.removeHandler(h)
        lg.propagate = True


@contextlib.contextmanager
def quiet(enabled: bool):
    """A sweep cell's output is its one verdict line: Lightning's banners ("GPU available",
    the litlogger tip) are INFO records of the `lightning` loggers, its notes warnings."""
    if not enabled:
        yield
        return
    import lightning.pytorch  # noqa: F401  (its import sets its loggers to INFO: first)

    loggers = [
        logging.getLogger(n)
        for n in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric")
    ]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _fill_outcome(record: Record, trainer, monitor, guard) -> None:
    """The outcome fields: the monitor's judge fills them (judge.StepJudge.fill_record, the
    one definition, shared with the transformers callback)."""
    monitor.fill_record(record)
    record.peak_memory_gb = round(_peak_memory_gb(), 3)


def _peak_memory_gb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _write_history(monitor, run_dir: Path) -> None:
    (run_dir / "history.csv").write_text(monitor.judge.history_csv())


def _finish_logger(logger, record: Record) -> None:
    """Summary and tag on the W&B run, then finish it: every job gets its own run, and a
    run that did not stay finite is marked failed."""
    if not logger:
        return
    try:
        from lightning.pytorch.loggers import WandbLogger

        if isinstance(logger, WandbLogger):
            exp = logger.experiment
            exp.summary.update(record.summary())
            exp.tags = tuple(exp.tags or ()) + (record.status,)
            exp.finish(exit_code=0 if record.status == "ok" else 1)
        else:
            logger.finalize(record.status)
    except Exception as e:  # noqa: BLE001 - the record is already written
        print(f"warning: could not finish the logger: {e}", file=sys.stderr)
