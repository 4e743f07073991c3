"""The outcome record: the one definition of what a run reports.

Every run writes exactly one `record.json` into its output directory, whatever happens
(ok, nonfinite, diverged, error). The report, the W&B summary and the tests all read these
fields from here. This module imports nothing heavy so the report can use it on a laptop.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

RECORD_NAME = "record.json"
# ok: stayed finite and trained (final loss below the initial loss by `train_margin`);
# stalled: finite but did not train; interrupted: stopped by a signal (SLURM preemption,
# time limit, Ctrl-C) and redone by a rerun of the sweep.
STATUSES = ("ok", "stalled", "nonfinite", "diverged", "interrupted", "error")
FAILED = ("nonfinite", "diverged")
# What the monitor names as the first non-finite value's cause (nanlab/diagnosis/monitor.py decides).
CAUSES = (
    "exp_overflow",
    "exp_underflow",
    "masked_row",
    "half_overflow",
    "empty_targets",
    "nonfinite_input",
    "grad_nonfinite",
    "optimizer_poison",
    "divergence",
    "unknown",
)
# The axes a sweep varies; the report shows cells by these. A cell's identity is `cell`
# (the hash of every config key that changes a run, the seed left out), never these alone.
AXES = (
    "precision",
    "softmax",
    "lr",
    "lr_x",
    "warmup_steps",
    "clip",
    "normalize",
    "stress",
    "guard",
    "model",
    "data",
    "seed",
)


@dataclass
class Record:
    # the swept axes
    precision: str = ""
    softmax: str = ""
    lr: float = float("nan")
    warmup_steps: int = 0
    clip: float = 0.0
    normalize: bool = True
    stress: str = "none"
    guard: str = "none"
    model: str = ""
    data: str = ""
    seed: int = 0
    lr_x: float | None = None  # lr as a multiple of the model's reference lr (model.ref_lr)
    ref_lr: float | None = None
    # the outcome
    status: str = "error"
    first_bad_step: int | None = None
    phase: str | None = None  # forward / backward / optimizer
    module: str | None = None  # first module in execution order that went non-finite
    dtype: str | None = None  # dtype in which it happened
    replay_agrees: bool | None = None  # the hooked replay of the failing step failed too
    cause: str | None = None  # why the first non-finite value appeared (CAUSES)
    cause_detail: str | None = None  # the evidence, e.g. "softmax input 93.1 > ln(max bf16) 88.7"
    cause_value: float | None = None  # the number behind it (logit, activation, ...)
    signal: str | None = None  # status == "interrupted": SIGTERM / SIGINT
    attempt: int = 1  # 1 + SLURM requeues of this job
    error: str | None = None  # one line, for status == "error"
    initial_loss: float | None = None  # the loss of step 0
    final_loss: float | None = None
    best_loss: float | None = None
    max_grad_norm: float | None = None
    max_attn_logit: float | None = None
    loss_spikes: int = 0
    guard_fired: int = 0  # steps a guard skipped or clamped
    scaler_skips: int = 0  # fp16 loss-scaler skipped steps (not failures)
    train_margin: float = 0.0  # ok needs final_loss < initial_loss * (1 - train_margin)
    nonfinite_grad_frac: float | None = None  # gradient elements non-finite at the bad step
    nonfinite_param_frac: float | None = None  # parameter elements non-finite after it
    empty_target_steps: int = 0  # steps whose batch had no supervised token
    switch_step: int | None = None  # progressive: the step bf16 started
    steps_done: int = 0
    max_steps: int = 0
    # the test-time outcome (nanlab/run/serve.py): a run that stayed finite, served on its test split
    test_status: str | None = None  # finite / nonfinite; None: not run (training not finite)
    test_samples: int = 0
    test_nonfinite: int = 0
    test_failing_ids: list[str] = field(default_factory=list)
    test_failing_pads: list[int] = field(default_factory=list)  # their left padding
    test_module: str | None = None  # first non-finite module of the first failing sample
    test_cause: str | None = None
    test_cause_detail: str | None = None
    test_precision: str | None = None  # the weights' dtype at serving
    test_padding_side: str | None = None
    test_wall_s: float | None = None
    wall_time_s: float = 0.0
    steps_per_s: float = 0.0
    peak_memory_gb: float | None = None  # GPU: max allocated; CPU: the process's max RSS
    # the regime (nanlab/diagnosis/regime.py), per tower at step 0 and at the last step (None:
    # the run stopped before it): median RMS(dW)/RMS(W) over the 2-D weights across that
    # step's update, the largest attention logit, the mean attention entropy (nats)
    rel_update_first_vision: float | None = None
    rel_update_first_text: float | None = None
    rel_update_last_vision: float | None = None
    rel_update_last_text: float | None = None
    attn_max_logit_first_vision: float | None = None
    attn_max_logit_first_text: float | None = None
    attn_max_logit_last_vision: float | None = None
    attn_max_logit_last_text: float | None = None
    attn_entropy_first_vision: float | None = None
    attn_entropy_first_text: float | None = None
    attn_entropy_last_vision: float | None = None
    attn_entropy_last_text: float | None = None
    # provenance
    config_hash: str = ""
    cell: str = ""  # the config hash without the seed: seeds of one cell share it
    config: dict = field(default_factory=dict)  # the resolved config (what the hash covers)
    overrides: list[str] = field(default_factory=list)
    run_dir: str = ""
    torch_version: str = ""
    transformers_version: str = ""
    device: str = ""
    half_gemm: str = ""  # how half-precision matmuls ran (native / fp32-accumulate)
    trainer: str = "nanlab"  # whose loop ran: nanlab (Lightning) / transformers / lightning

    @classmethod
    def from_spec(cls, spec, run_dir: str | os.PathLike = "") -> Record:
        """The record of a run before it runs: its axes and provenance from its RunSpec
        (nanlab.config.specs), the outcome left for the run to fill."""
        ref_lr = spec.model.ref_lr
        return cls(
            precision=spec.precision.name,
            softmax=spec.softmax.name,
            lr=float(spec.optim.lr),
            warmup_steps=spec.optim.warmup_steps,
            clip=float(spec.optim.clip),
            normalize=spec.data.normalize,
            stress=spec.stress.name,
            guard=spec.guard.name,
            model=spec.model.name,
            data=spec.data.name,
            seed=spec.seed,
            max_steps=spec.optim.max_steps,
            config_hash=spec.config_hash,
            cell=spec.cell,
            config=hashed_config(spec.config),
            ref_lr=ref_lr,
            lr_x=spec.optim.lr / ref_lr if ref_lr else None,
            train_margin=spec.monitor.train_margin,
            switch_step=(
                spec.precision.switch_step if spec.precision.name == "progressive" else None
            ),
            attempt=int(os.environ.get("SLURM_RESTART_COUNT") or 0) + 1,
            overrides=list(spec.overrides),
            run_dir=str(run_dir),
        )

    def sections(self) -> dict:
        """The record as record.json holds it: a few sections (SECTIONS), not 70 flat keys."""
        flat = asdict(self)
        return {section: {k: flat[k] for k in keys} for section, keys in SECTIONS.items()}

    def verdict(self) -> str:
        """One paragraph: what broke, where, when, and why."""
        lr = f"lr={self.lr:g}" + (f" ({self.lr_x:g}x ref)" if self.lr_x is not None else "")
        cell = (
            f"precision={self.precision} softmax={self.softmax} {lr} "
            f"warmup={self.warmup_steps} clip={self.clip:g} stress={self.stress} "
            f"guard={self.guard} seed={self.seed}"
        )
        trained = (
            f"loss {_fmt(self.initial_loss)} -> {_fmt(self.final_loss)} "
            f"(best {_fmt(self.best_loss)})"
        )
        why = (
            (
                f" Cause: {self.cause}"
                + (f" ({self.cause_detail})" if self.cause_detail else "")
                + "."
            )
            if self.cause
            else ""
        )
        if self.status == "ok":
            return (
                f"OK: {cell} stayed finite and trained for {self.steps_done} steps: "
                f"{trained}, max grad norm {_fmt(self.max_grad_norm)}, max attention "
                f"logit {_fmt(self.max_attn_logit)}.{self.test_verdict()}"
            )
        if self.status == "stalled":
            return (
                f"STALLED: {cell} stayed finite for {self.steps_done} steps but did not "
                f"train: {trained}; ok needs the final loss {self.train_margin:.0%} below "
                f"the initial one.{why}{self.test_verdict()}"
            )
        if self.status == "nonfinite":
            return (
                f"NON-FINITE: {cell} first went non-finite at step {self.first_bad_step} "
                f"in the {self.phase} pass, first in module {self.module} "
                f"({self.dtype}); last finite loss {_fmt(self.final_loss)}, max grad norm "
                f"{_fmt(self.max_grad_norm)}, max attention logit "
                f"{_fmt(self.max_attn_logit)}.{why}{_fix_line(self.cause)}"
            )
        if self.status == "diverged":
            return (
                f"DIVERGED: {cell} stayed finite but the loss ran away from its best "
                f"({_fmt(self.best_loss)}) from step {self.first_bad_step} on "
                f"(final loss {_fmt(self.final_loss)}, {self.loss_spikes} spikes).{why}"
                f"{_fix_line(self.cause)}"
            )
        if self.status == "interrupted":
            return (
                f"INTERRUPTED: {cell} stopped by {self.signal} after {self.steps_done} "
                f"steps (attempt {self.attempt}); rerunning the sweep redoes it."
            )
        return f"ERROR: {cell} did not run: {self.error}"

    def brief(self) -> str:
        """A few words for a sweep's one line per cell: the cause and step of a failure, the
        loss of a finite run, the test-time result when it failed."""
        if self.status in ("nonfinite", "diverged"):
            text = f"{self.cause or 'unknown'} at step {self.first_bad_step}"
        elif self.status in ("ok", "stalled"):
            text = f"loss {_fmt(self.initial_loss)} -> {_fmt(self.final_loss)}"
            if self.test_status not in (None, "finite"):
                text += f", test {self.test_nonfinite}/{self.test_samples} non-finite"
        elif self.status == "interrupted":
            text = f"{self.signal} after {self.steps_done} steps"
        else:
            text = str(self.error or "")[:120]
        return text

    def test_verdict(self) -> str:
        if self.test_status is None:
            return ""
        where = f"served {self.test_precision}, {self.test_padding_side} padding"
        if self.test_status == "finite":
            return f" Test time: all {self.test_samples} test samples finite ({where})."
        return (
            f" Test time: {self.test_nonfinite} of {self.test_samples} test samples "
            f"NON-FINITE ({where}): {', '.join(self.test_failing_ids[:6])}; first in "
            f"{self.test_module}, cause {self.test_cause}.{_fix_line(self.test_cause, 'test')}"
        )

    def summary(self) -> dict:
        """Flat fields for the W&B run summary."""
        return {
            f"outcome/{k}": v for k, v in asdict(self).items() if v is not None and k != "config"
        }


# record.json's sections. Every field is in exactly one (tests/test_record.py), so a new field
# must say what it is; CSV and W&B get the flat fields (asdict / `summary`).
SECTIONS = {
    "config": (
        "precision",
        "softmax",
        "lr",
        "lr_x",
        "ref_lr",
        "warmup_steps",
        "clip",
        "normalize",
        "stress",
        "guard",
        "model",
        "data",
        "seed",
        "max_steps",
        "train_margin",
        "switch_step",
    ),
    "outcome": (
        "status",
        "first_bad_step",
        "phase",
        "module",
        "dtype",
        "replay_agrees",
        "signal",
        "attempt",
        "error",
        "steps_done",
        "initial_loss",
        "final_loss",
        "best_loss",
        "loss_spikes",
        "guard_fired",
        "scaler_skips",
        "empty_target_steps",
    ),
    "cause": (
        "cause",
        "cause_detail",
        "cause_value",
        "nonfinite_grad_frac",
        "nonfinite_param_frac",
    ),
    "test": (
        "test_status",
        "test_samples",
        "test_nonfinite",
        "test_failing_ids",
        "test_failing_pads",
        "test_module",
        "test_cause",
        "test_cause_detail",
        "test_precision",
        "test_padding_side",
        "test_wall_s",
    ),
    "regime": (
        "max_grad_norm",
        "max_attn_logit",
        *(
            f"{what}_{when}_{tower}"
            for what in ("rel_update", "attn_max_logit", "attn_entropy")
            for when in ("first", "last")
            for tower in ("vision", "text")
        ),
    ),
    "provenance": (
        "config_hash",
        "cell",
        "config",
        "overrides",
        "run_dir",
        "trainer",
        "torch_version",
        "transformers_version",
        "device",
        "half_gemm",
        "wall_time_s",
        "steps_per_s",
        "peak_memory_gb",
    ),
}


def flatten(data: dict) -> dict:
    """record.json's sections (or an older flat record) as the Record's flat fields."""
    if isinstance(data.get("outcome"), dict) and isinstance(data.get("provenance"), dict):
        return {k: v for section in SECTIONS for k, v in (data.get(section) or {}).items()}
    return data


def _fix_line(cause, judged_on: str = "training") -> str:
    """What the committed map measured as fixes for this cause (nanlab/integrations/fixes.py)."""
    from nanlab.integrations.fixes import fix_line

    return fix_line(cause, judged_on)


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def write_record(record: Record, run_dir: str | os.PathLike) -> Path:
    """Atomic: a temporary file in the same directory, then rename."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / RECORD_NAME
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=".record.", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(record.sections(), f, indent=2, default=_json_default)
    os.replace(tmp, target)
    return target


def _json_default(x):
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def read_record(path: str | os.PathLike) -> Record:
    data = flatten(json.loads(Path(path).read_text()))
    known = {f.name for f in fields(Record)}
    return Record(**{k: v for k, v in data.items() if k in known})


def find_records(*roots: str | os.PathLike) -> list[Path]:
    return sorted(p for root in roots for p in Path(root).rglob(RECORD_NAME))


def find_done(root: str | os.PathLike, config_hash: str) -> Path | None:
    """A record of this config under root that a rerun should keep (not error/interrupted)."""
    for path in find_records(root):
        rec = read_record(path)
        if rec.config_hash == config_hash and rec.status not in ("error", "interrupted"):
            return path
    return None


def short(name: str | None) -> str:
    """A module's name as records and tables show it: llm.0.self_attn, vit.1.attn."""
    if name is None:
        return "-"
    return (
        name.replace("model.language_model.layers.", "llm.")
        .replace("model.visual.blocks.", "vit.")
        .replace("model.", "")
    )


# Keys that change how a run is logged or stored, not what it computes: left out of the hash.
UNHASHED = ("logger", "force", "trainer", "save", "out_dir")


def hashed_config(cfg: dict) -> dict:
    """The part of the resolved config that changes what a run computes: a record's
    `config`, and what its `config_hash` and `cell` identify."""
    return {k: v for k, v in cfg.items() if k not in UNHASHED and k != "hydra"}


def config_hash(cfg: dict, leave_out: tuple[str, ...] = ()) -> str:
    kept = {k: v for k, v in hashed_config(cfg).items() if k not in leave_out}
    return hashlib.sha1(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:12]
