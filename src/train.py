"""The Hydra entry point: config -> plain specs -> fit -> one outcome record.

    python -m src.train precision=bf16 softmax=stable -m lr=1e-5,5e-5

Only this file (and the other entry points) sees Hydra. `run(spec, run_dir)` below is
plain Python: the replay and the probe call it too.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import src  # noqa: F401  (sets the offline environment before anything else loads)

from .attention import SoftmaxSpec
from .data import DataSpec
from .guards import GuardSpec
from .model import LoraSpec, ModelSpec
from .module import OptimSpec
from .monitor import MonitorSpec
from .precision import PrecisionSpec
from .record import Record, find_records, read_record, write_record
from .serve import ServeSpec
from .stress import StressSpec

# Lightning notes that do not apply here: the module's batch hook is meant to win over the
# datamodule's; the pytree deprecation is Lightning's own.
warnings.filterwarnings("ignore", message=".*on_after_batch_transfer.*")
warnings.filterwarnings("ignore", message=".*LeafSpec.*")
warnings.filterwarnings("ignore", message=".*litlogger.*")
warnings.filterwarnings("ignore", message=".*dataloader is not resumable.*")

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# Keys that change how a run is logged or stored, not what it computes: left out of the hash.
UNHASHED = ("logger", "force", "trainer", "save", "out_dir")


@dataclass
class LoggerSpec:
    name: str = "wandb"          # wandb | csv | none
    mode: str = "offline"        # wandb only: offline | online
    project: str = "nanlab"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class TrainerSpec:
    accelerator: str = "auto"
    devices: int | str = 1
    strategy: str = "auto"
    val_every: int = 0           # validate every N steps (0: never)
    progress: bool = True
    log_every: int = 1
    cpu_threads: int = 1         # torch threads on CPU (0: torch's default)


@dataclass
class SaveSpec:
    checkpoint: bool = False     # Lightning checkpoint (last.ckpt) for resuming
    hf: bool = False             # the fine-tuned model in Hugging Face format at the end
    lora_merged: bool = True


@dataclass
class RunSpec:
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    precision: PrecisionSpec = field(default_factory=PrecisionSpec)
    softmax: SoftmaxSpec = field(default_factory=SoftmaxSpec)
    stress: StressSpec = field(default_factory=StressSpec)
    guard: GuardSpec = field(default_factory=GuardSpec)
    monitor: MonitorSpec = field(default_factory=MonitorSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    logger: LoggerSpec = field(default_factory=LoggerSpec)
    trainer: TrainerSpec = field(default_factory=TrainerSpec)
    save: SaveSpec = field(default_factory=SaveSpec)
    serve: ServeSpec = field(default_factory=ServeSpec)
    batch_size: int = 4
    seed: int = 0
    ckpt_path: str | None = None
    config_hash: str = ""
    cell: str = ""               # config_hash without the seed: the report's cell identity
    overrides: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)  # the resolved config, for W&B


# --- config -> specs ------------------------------------------------------------------

def _build(cls, node: dict, key: str):
    """A dataclass from a config node; unknown keys are a one-line error naming them."""
    node = dict(node or {})
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(node) - set(names))
    if unknown:
        raise ValueError(f"{key}.{unknown[0]}: unknown key; allowed: {', '.join(sorted(names))}")
    return cls(**node)


def hashed_config(cfg: dict) -> dict:
    """The part of the resolved config that changes what a run computes."""
    return {k: v for k, v in cfg.items() if k not in UNHASHED and k != "hydra"}


def config_hash(cfg: dict, leave_out: tuple[str, ...] = ()) -> str:
    kept = {k: v for k, v in hashed_config(cfg).items() if k not in leave_out}
    return hashlib.sha1(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:12]


def spec_from_config(cfg: dict, overrides: list[str] | None = None) -> RunSpec:
    """The resolved config (a plain dict) as typed specs, every value checked."""
    top = {"lr", "warmup_steps", "clip", "max_steps", "weight_decay"}
    optim = {k: cfg[k] for k in top if k in cfg}
    node = dict(cfg.get("optim") or {})  # the optimizer's own switches (conf/config.yaml)
    allowed = ("name", "eps", "betas", "z_loss")
    for key in sorted(node):
        if key not in allowed:
            where = " (a top-level key: lr=...)" if key in top else ""
            raise ValueError(f"optim.{key}: unknown key{where}; allowed: {', '.join(allowed)}")
    optim.update(node)
    lr_x, ref_lr = cfg.get("lr_x"), (cfg.get("model") or {}).get("ref_lr")
    if lr_x is not None:  # the lr as a multiple of the model's reference fine-tuning lr
        if not (isinstance(lr_x, (int, float)) and lr_x > 0):
            raise ValueError(f"lr_x={lr_x}: must be a positive number (lr = lr_x * model.ref_lr)")
        if not ref_lr:
            raise ValueError(f"lr_x={lr_x}: model.ref_lr is not set for model="
                             f"{(cfg.get('model') or {}).get('name')}; give lr= instead")
        optim["lr"] = float(lr_x) * float(ref_lr)
    optim["vision_lr"] = (cfg.get("model") or {}).get("vision_lr")
    model_node = dict(cfg.get("model") or {})
    if isinstance(model_node.get("lora"), dict):
        model_node["lora"] = _build(LoraSpec, model_node["lora"], "model.lora")
    spec = RunSpec(
        model=_build(ModelSpec, model_node, "model"),
        data=_build(DataSpec, cfg.get("data"), "data"),
        precision=_build(PrecisionSpec, cfg.get("precision"), "precision"),
        softmax=_build(SoftmaxSpec, cfg.get("softmax"), "softmax"),
        stress=_build(StressSpec, cfg.get("stress"), "stress"),
        guard=_build(GuardSpec, cfg.get("guard"), "guard"),
        monitor=_build(MonitorSpec, cfg.get("monitor"), "monitor"),
        optim=_build(OptimSpec, optim, "optim"),
        logger=_build(LoggerSpec, cfg.get("logger"), "logger"),
        trainer=_build(TrainerSpec, cfg.get("trainer"), "trainer"),
        save=_build(SaveSpec, cfg.get("save"), "save"),
        serve=_build(ServeSpec, cfg.get("serve"), "serve"),
        batch_size=cfg.get("batch_size", 4),
        seed=cfg.get("seed", 0),
        ckpt_path=cfg.get("ckpt_path"),
        config_hash=config_hash(cfg),
        cell=config_hash(cfg, leave_out=("seed",)),
        overrides=list(overrides or []),
        config=cfg,
    )
    check(spec)
    return spec


def compose_spec(*overrides: str) -> RunSpec:
    """The RunSpec that `python -m src.train OVERRIDES...` would run (for tests, benchmarks)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return spec_from_config(OmegaConf.to_container(cfg, resolve=True), list(overrides))


def check(spec: RunSpec) -> None:
    o = spec.optim
    o.check()
    rules = [
        (not (isinstance(o.lr, (int, float)) and o.lr > 0 and math.isfinite(o.lr)),
         f"lr={o.lr}: must be a positive number"),
        (o.warmup_steps < 0, f"warmup_steps={o.warmup_steps}: must be >= 0"),
        (o.clip < 0, f"clip={o.clip}: must be >= 0 (0 turns clipping off)"),
        (o.max_steps <= 0, f"max_steps={o.max_steps}: must be > 0"),
        (spec.batch_size <= 0, f"batch_size={spec.batch_size}: must be > 0"),
        (spec.logger.name not in ("wandb", "csv", "none"),
         f"logger={spec.logger.name}: allowed wandb, csv, none"),
        (spec.logger.mode not in ("offline", "online"),
         f"logger.mode={spec.logger.mode}: allowed offline, online"),
    ]
    for bad, message in rules:
        if bad:
            raise ValueError(message)
    spec.serve.check()
    from . import attention, guards, precision, stress

    for allowed, value, key in ((attention.VARIANTS, spec.softmax.name, "softmax"),
                                (precision.PRECISIONS, spec.precision.name, "precision"),
                                (stress.STRESSES, spec.stress.name, "stress"),
                                (guards.GUARDS, spec.guard.name, "guard")):
        if value not in allowed:
            raise ValueError(f"{key}={value}: allowed {', '.join(allowed)}")


# --- one run ----------------------------------------------------------------------------

def _device(spec: RunSpec) -> str:
    import torch

    if spec.trainer.accelerator in ("cpu",):
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


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


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def run(spec: RunSpec, run_dir: str | Path, extra_callbacks: list | None = None) -> Record:
    """Build everything, fit, and return the outcome record (also written to run_dir).
    `extra_callbacks` lets the benchmark time steps without touching the setup."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from . import attention, guards, precision, stress
    from .data import NanDataModule
    from .model import build_model
    from .module import NanLabModule
    from .monitor import NanMonitor
    from .processing import load_processor

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = base_record(spec, run_dir)
    started = time.time()
    logger = None
    interrupted: Interrupted | None = None
    trainer = None
    # Lightning composes its own SIGTERM handler with this one (it calls both).
    previous = {sig: signal.signal(sig, _raise_interrupted)
                for sig in (signal.SIGTERM, signal.SIGINT)} if _main_thread() else {}
    try:
        L.seed_everything(spec.seed, workers=True, verbose=False)
        device = _device(spec)
        if device == "cpu" and spec.trainer.cpu_threads:
            torch.set_num_threads(spec.trainer.cpu_threads)
        processor = load_processor(spec.data.processor_spec(), spec.model.path)
        data = NanDataModule(spec.data, processor, spec.batch_size, spec.seed)
        model = build_model(spec.model, spec.seed)
        attention.apply(model, spec.softmax, spec.stress.mask)
        module = NanLabModule(model, spec.optim, stress.lr_multiplier(spec.stress),
                              stress.batch_transform(spec.stress,
                                                     processor.tokenizer.pad_token_id))
        if spec.stress.name in stress.NEEDS_MODEL:
            data.setup("fit")
            calib = module.transform(next(iter(data.train_dataloader())), step=0)
            stress.apply_to_model(spec.stress, model, calib, module.compute_loss,
                                  processor.tokenizer.convert_tokens_to_ids(spec.stress.token))
        plugin, precision_callbacks = precision.build_plugin(spec.precision, device)
        record.half_gemm = getattr(plugin, "half_gemm", "native")
        guard_callbacks, guard = guards.build_guard(spec.guard, model)
        monitor = NanMonitor(spec.monitor, tolerate_nonfinite_grads=spec.guard.name == "skip_step")
        callbacks = [monitor, *guard_callbacks, *precision_callbacks, *(extra_callbacks or [])]
        logger = _logger(spec, run_dir)
        if logger:
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        if spec.save.checkpoint:
            callbacks.append(ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), save_last=True,
                                             every_n_train_steps=max(spec.optim.max_steps // 4, 1)))
        val_every = spec.trainer.val_every
        trainer = L.Trainer(
            accelerator=device, devices=spec.trainer.devices, strategy=spec.trainer.strategy,
            plugins=[plugin], max_steps=spec.optim.max_steps, callbacks=callbacks,
            logger=logger, default_root_dir=str(run_dir),
            gradient_clip_val=spec.optim.clip or None, gradient_clip_algorithm="norm",
            val_check_interval=val_every or None, check_val_every_n_epoch=None,
            limit_val_batches=1.0 if val_every else 0, num_sanity_val_steps=0,
            enable_checkpointing=spec.save.checkpoint, enable_progress_bar=spec.trainer.progress,
            log_every_n_steps=spec.trainer.log_every, enable_model_summary=False,
        )
        trainer.fit(module, datamodule=data, ckpt_path=spec.ckpt_path)
        _fill_outcome(record, trainer, monitor, guard)
        if monitor.failing_batch is not None:
            torch.save({k: v for k, v in monitor.failing_batch.items()}, run_dir / "failing_batch.pt")
        if spec.save.hf and record.status == "ok":
            from .checkpoint import save_pretrained

            save_pretrained(module.model, processor, run_dir / "hf", spec.save.lora_merged)
        if spec.serve.enabled and record.status in ("ok", "stalled") and data.test:
            # the symptom users report: finite in training, NaN on some test samples served
            from .serve import serve_test

            for key, value in serve_test(module.model, processor, data.test, spec.serve,
                                         spec.data, record.half_gemm).items():
                setattr(record, key, value)
        _write_history(monitor, run_dir)
    except Interrupted as e:
        interrupted = e
        record.status, record.signal = "interrupted", str(e)
        record.steps_done = trainer.global_step if trainer is not None else 0
    except Exception as e:  # noqa: BLE001 - every failure becomes a record, never a crash
        record.status = "error"
        record.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        (run_dir / "error.txt").write_text(traceback.format_exc())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        record.wall_time_s = round(time.time() - started, 2)
        write_record(record, run_dir)
        _finish_logger(logger, record)
    if interrupted is not None:  # the record is written: now stop as the signal asked
        print(record.verdict(), file=sys.stderr)
        raise SystemExit(128 + interrupted.signum)
    return record


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _fill_outcome(record: Record, trainer, monitor, guard) -> None:
    h = monitor.history
    finite = [x for x in h.loss if math.isfinite(x)]
    record.steps_done = trainer.global_step
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


# --- the Hydra entry -------------------------------------------------------------------

def find_done(root: Path, config_hash: str) -> Path | None:
    for path in find_records(root):
        rec = read_record(path)
        if rec.config_hash == config_hash and rec.status not in ("error", "interrupted"):
            return path
    return None


LAST_STATUS: list[str] = []


def hydra_job(cfg) -> str:
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    overrides = list(hc.overrides.task)
    if _main_thread():
        # from the job's first line, not only inside run(): submitit ignores SIGTERM until
        # the task starts, and a time limit in these seconds would leave no record
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _raise_interrupted)
    try:
        return _job(cfg, hc, run_dir, overrides)
    except Interrupted as e:  # before run() took over: still one record, then stop
        write_record(Record(status="interrupted", signal=str(e), overrides=overrides,
                            run_dir=str(run_dir)), run_dir)
        raise SystemExit(128 + e.signum) from None


def _job(cfg, hc, run_dir: Path, overrides: list[str]) -> str:
    from omegaconf import OmegaConf

    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
        spec = spec_from_config(plain, overrides)
    except Exception as e:  # noqa: BLE001 - a bad cell is a record, the sweep goes on
        record = Record(status="error", error=f"{type(e).__name__}: {e}", overrides=overrides,
                        run_dir=str(run_dir))
        for key in ("precision", "softmax", "stress", "guard"):
            setattr(record, key, str(OmegaConf.select(cfg, f"{key}.name", default="")))
        record.lr = float(cfg.get("lr")) if isinstance(cfg.get("lr"), (int, float)) else math.nan
        record.seed = int(cfg.get("seed", 0))
        write_record(record, run_dir)
        print(f"error: {e}", file=sys.stderr)
        LAST_STATUS.append("error")
        return "error"
    if hc.mode.name == "MULTIRUN" and not cfg.get("force", False):
        done = find_done(Path(hc.sweep.dir), spec.config_hash)
        if done is not None:
            print(f"skip: this cell is done already ({done}); force=true reruns it")
            LAST_STATUS.append("skipped")
            return "skipped"
    record = run(spec, run_dir)
    print(record.verdict())
    LAST_STATUS.append(record.status)
    return record.status


def validate_cli(argv: list[str]) -> str | None:
    """Unknown config-group options, as one line naming the key and the allowed values
    (Hydra's own message spans several lines and stops a multirun)."""
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra"}
    for arg in argv:
        if "=" not in arg or arg.startswith("-"):
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if key not in groups or value in ("", "null") or "(" in value:
            continue
        allowed = sorted(p.stem for p in (CONF_DIR / key).glob("*.yaml"))
        for option in value.split(","):
            if option not in allowed:
                return f"{key}={option}: unknown option; allowed: {', '.join(allowed)}"
    return None


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
