"""The outcome record: the one definition of what a run reports.

Every run writes exactly one `record.json` into its output directory, whatever happens
(ok, nonfinite, diverged, error). The report, the W&B summary and the tests all read these
fields from here. This module imports nothing heavy so the report can use it on a laptop.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

RECORD_NAME = "record.json"
STATUSES = ("ok", "nonfinite", "diverged", "error")
# The axes a sweep varies; the report groups and compares cells by these.
AXES = ("precision", "softmax", "lr", "warmup_steps", "clip", "normalize", "stress", "guard",
        "model", "data", "seed")


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
    # the outcome
    status: str = "error"
    first_bad_step: int | None = None
    phase: str | None = None        # forward / backward / optimizer
    module: str | None = None       # first module in execution order that went non-finite
    dtype: str | None = None        # dtype in which it happened
    replay_agrees: bool | None = None  # the hooked replay of the failing step failed too
    error: str | None = None        # one line, for status == "error"
    final_loss: float | None = None
    best_loss: float | None = None
    max_grad_norm: float | None = None
    max_attn_logit: float | None = None
    loss_spikes: int = 0
    guard_fired: int = 0            # steps a guard skipped or clamped
    scaler_skips: int = 0           # fp16 loss-scaler skipped steps (not failures)
    steps_done: int = 0
    max_steps: int = 0
    wall_time_s: float = 0.0
    steps_per_s: float = 0.0
    peak_memory_gb: float | None = None  # GPU: max allocated; CPU: the process's max RSS
    # provenance
    config_hash: str = ""
    overrides: list[str] = field(default_factory=list)
    run_dir: str = ""
    torch_version: str = ""
    transformers_version: str = ""
    device: str = ""
    half_gemm: str = ""             # how half-precision matmuls ran (native / fp32-accumulate)

    def verdict(self) -> str:
        """One paragraph: what broke, where, when."""
        cell = (f"precision={self.precision} softmax={self.softmax} lr={self.lr:g} "
                f"warmup={self.warmup_steps} clip={self.clip:g} stress={self.stress} "
                f"guard={self.guard} seed={self.seed}")
        if self.status == "ok":
            return (f"OK: {cell} stayed finite for {self.steps_done} steps "
                    f"(final loss {self.final_loss:.4g}, best {self.best_loss:.4g}, "
                    f"max grad norm {self.max_grad_norm:.3g}, max attention logit "
                    f"{_fmt(self.max_attn_logit)}).")
        if self.status == "nonfinite":
            return (f"NON-FINITE: {cell} first went non-finite at step {self.first_bad_step} "
                    f"in the {self.phase} pass, first in module {self.module} "
                    f"({self.dtype}); last finite loss {_fmt(self.final_loss)}, max grad norm "
                    f"{_fmt(self.max_grad_norm)}, max attention logit "
                    f"{_fmt(self.max_attn_logit)}.")
        if self.status == "diverged":
            return (f"DIVERGED: {cell} stayed finite but the loss ran away from its best "
                    f"({_fmt(self.best_loss)}) from step {self.first_bad_step} on "
                    f"(final loss {_fmt(self.final_loss)}, {self.loss_spikes} spikes).")
        return f"ERROR: {cell} did not run: {self.error}"

    def summary(self) -> dict:
        """Flat fields for the W&B run summary."""
        return {f"outcome/{k}": v for k, v in asdict(self).items() if v is not None}


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def write_record(record: Record, run_dir: str | os.PathLike) -> Path:
    """Atomic: a temporary file in the same directory, then rename."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / RECORD_NAME
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=".record.", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(record), f, indent=2, default=_json_default)
    os.replace(tmp, target)
    return target


def _json_default(x):
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def read_record(path: str | os.PathLike) -> Record:
    data = json.loads(Path(path).read_text())
    known = {f.name for f in fields(Record)}
    return Record(**{k: v for k, v in data.items() if k in known})


def find_records(*roots: str | os.PathLike) -> list[Path]:
    return sorted(p for root in roots for p in Path(root).rglob(RECORD_NAME))
