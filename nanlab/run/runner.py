"""One run, plain Python: specs -> parts (src/build.py) -> Lightning fit -> one outcome record.

`run(spec, run_dir)` is what `python -m src.train` calls for every cell, and what tests,
the benchmark and the replay call directly. It never raises for a failing run: every failure
is a record (status, cause, where), written to run_dir/record.json.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

from nanlab.config.specs import RunSpec
from nanlab.record import Record, hashed_config, write_record

# Lightning notes that do not apply here: the module's batch hook is meant to win over the
# datamodule's; the pytree deprecation is Lightning's own.
warnings.filterwarnings("ignore", message=".*on_after_batch_transfer.*")
warnings.filterwarnings("ignore", message=".*LeafSpec.*")
warnings.filterwarnings("ignore", message=".*litlogger.*")
warnings.filterwarnings("ignore", message=".*dataloader is not resumable.*")


# --- one run ----------------------------------------------------------------------------

def _logger(spec: RunSpec, run_dir: Path):
    if spec.logger.name == "none":
        return False
    if spec.logger.name == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(run_dir), name="csv")
    from lightning.pytorch.loggers import WandbLogger

    # mode goes to wandb.init directly: no WANDB_MODE env var leaks into later jobs.
    return WandbLogger(save_dir=str(run_dir), project=spec.logger.project,
                       entity=spec.logger.entity, mode=spec.logger.mode,
                       name=run_dir.name, tags=list(spec.logger.tags), config=spec.config)


def base_record(spec: RunSpec, run_dir: Path) -> Record:
    import torch
    import transformers

    return Record(
        precision=spec.precision.name, softmax=spec.softmax.name, lr=float(spec.optim.lr),
        warmup_steps=spec.optim.warmup_steps, clip=float(spec.optim.clip),
        normalize=spec.data.normalize, stress=spec.stress.name, guard=spec.guard.name,
        model=spec.model.name, data=spec.data.name, seed=spec.seed,
        max_steps=spec.optim.max_steps, config_hash=spec.config_hash, cell=spec.cell,
        config=hashed_config(spec.config), ref_lr=spec.model.ref_lr,
        lr_x=spec.optim.lr / spec.model.ref_lr if spec.model.ref_lr else None,
        train_margin=spec.monitor.train_margin,
        switch_step=spec.precision.switch_step if spec.precision.name == "progressive" else None,
        attempt=int(os.environ.get("SLURM_RESTART_COUNT") or 0) + 1,
        overrides=spec.overrides, run_dir=str(run_dir), torch_version=torch.__version__,
        transformers_version=transformers.__version__,
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else _cpu_name(),
    )


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
    previous = {sig: signal.signal(sig, raise_interrupted)
                for sig in (signal.SIGTERM, signal.SIGINT)} if main_thread() else {}
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
    from nanlab.numerics import stress
    from nanlab.run.build import build_parts, pick_device, plant_stress
    from nanlab.run.module import NanLabModule

    L.seed_everything(spec.seed, workers=True, verbose=False)
    device = pick_device(spec.trainer.accelerator)
    if device == "cpu" and spec.trainer.cpu_threads:
        torch.set_num_threads(spec.trainer.cpu_threads)
    parts = build_parts(spec.model, spec.data, spec.softmax, spec.stress, spec.precision,
                        spec.seed, device)
    data = NanDataModule(spec.data, parts.processor, spec.batch_size, spec.seed)
    module = NanLabModule(parts.model, spec.optim, stress.lr_multiplier(spec.stress),
                          parts.batch_transform)
    if spec.stress.name in stress.NEEDS_MODEL:
        data.setup("fit")
        calib = module.transform(next(iter(data.train_dataloader())), step=0)
        plant_stress(parts, spec.stress, calib, module.compute_loss)
    record.half_gemm = parts.half_gemm
    # the monitor before the guard: it must see the gradients skip_step drops (check_order)
    checks, monitor, guard = build_callbacks(spec.monitor, spec.guard, parts.model)
    # progressive's switch first: the monitor's snapshot of a step (for its replay) must see
    # the precision the step runs in, also at the switch step itself
    callbacks = [*parts.precision_callbacks, *checks, *(extra_callbacks or [])]
    logger = made["logger"] = _logger(spec, run_dir)
    if logger:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if spec.save.checkpoint:
        callbacks.append(ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), save_last=True,
                                         every_n_train_steps=max(spec.optim.max_steps // 4, 1)))
    val_every = spec.trainer.val_every
    trainer = made["trainer"] = L.Trainer(
        accelerator=device, devices=spec.trainer.devices, strategy=spec.trainer.strategy,
        plugins=[parts.plugin], max_steps=spec.optim.max_steps, callbacks=callbacks,
        logger=logger, default_root_dir=str(run_dir),
        gradient_clip_val=spec.optim.clip or None, gradient_clip_algorithm="norm",
        val_check_interval=val_every or None, check_val_every_n_epoch=None,
        limit_val_batches=1.0 if val_every else 0, num_sanity_val_steps=0,
        enable_checkpointing=spec.save.checkpoint,
        # a sweep's cells print one line each (src/sweep.py shows progress instead)
        enable_progress_bar=spec.trainer.progress and not spec.multirun,
        log_every_n_steps=spec.trainer.log_every, enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data, ckpt_path=spec.ckpt_path)
    _fill_outcome(record, trainer, monitor, guard)
    if monitor.failing_batch is not None:
        torch.save(dict(monitor.failing_batch.items()), run_dir / "failing_batch.pt")
    if spec.save.hf and record.status == "ok":
        from nanlab.model.checkpoint import save_pretrained

        save_pretrained(module.model, parts.processor, run_dir / "hf", spec.save.lora_merged)
    if spec.serve.enabled and record.status in ("ok", "stalled") and data.test:
        # the symptom users report: finite in training, NaN on some test samples served
        from nanlab.run.serve import serve_test

        for key, value in serve_test(module.model, parts.processor, data.test, spec.serve,
                                     spec.data, record.half_gemm).items():
            setattr(record, key, value)
    _write_history(monitor, run_dir)


@contextlib.contextmanager
def quiet(enabled: bool):
    """A sweep cell's output is its one verdict line: Lightning's banners ("GPU available",
    the litlogger tip) are INFO records of the `lightning` loggers, its notes warnings."""
    if not enabled:
        yield
        return
    import lightning.pytorch  # noqa: F401  (its import sets its loggers to INFO: first)

    loggers = [logging.getLogger(n) for n in ("lightning", "lightning.pytorch",
                                               "lightning.fabric", "lightning_fabric")]
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
    h = monitor.history
    finite = [x for x in h.loss if math.isfinite(x)]
    record.steps_done = monitor.steps_done  # deferred checks may have run past a failure
    record.initial_loss = finite[0] if finite else None
    record.final_loss = finite[-1] if finite else None
    record.best_loss = min(finite) if finite else None
    record.max_grad_norm = monitor.max_grad_norm
    record.max_attn_logit = monitor.max_attn_logit
    record.loss_spikes = monitor.spikes
    record.scaler_skips = monitor.scaler_skips
    record.guard_fired = getattr(guard, "fired", 0)
    record.steps_per_s = round(len(h.step) / max(time.time() - monitor.started, 1e-9), 3)
    record.peak_memory_gb = round(_peak_memory_gb(), 3)
    record.empty_target_steps = monitor.empty_steps
    f = monitor.failure or monitor.empty  # empty targets: a NaN loss, the run went on
    if f is None:
        record.status = "ok" if _trained(record) else "stalled"
        record.dtype = monitor.attn_dtype
        return
    record.status = f.status
    record.cause, record.cause_detail, record.cause_value = f.cause, f.cause_detail, f.cause_value
    record.nonfinite_grad_frac, record.nonfinite_param_frac = f.grad_frac, f.param_frac
    record.first_bad_step = f.step
    if f.status == "nonfinite" and f is monitor.failure:
        record.steps_done = f.step  # steps 0..k-1 finished finite; step k broke
    record.phase, record.module, record.dtype = f.phase, f.module, f.dtype
    record.replay_agrees = f.replay_agrees


def _trained(record: Record) -> bool:
    first, last = record.initial_loss, record.final_loss
    return first is not None and last is not None and last < first * (1 - record.train_margin)


def _peak_memory_gb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _write_history(monitor, run_dir: Path) -> None:
    h = monitor.history
    lines = ["step,loss,grad_norm,lr"] + [
        f"{s},{lo},{g},{lr}" for s, lo, g, lr in zip(h.step, h.loss, h.grad_norm, h.lr)]
    (run_dir / "history.csv").write_text("\n".join(lines) + "\n")


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


