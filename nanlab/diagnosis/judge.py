"""The judgement of a training step, framework-free: one owner for "is the loss finite? the
gradients? the weights? which failure, which cause?".

`StepJudge` takes the numbers a step produced (loss finite or not, total gradient norm, the
weights after the update, the loss) in the order a step produces them and decides: go on,
or fail (status, step, phase, cause). It keeps the run's Failure and History and the counts
the record reports. It imports no training framework: the Lightning callback
(`monitor.NanMonitor`: every step, or deferred with `deferred.DeferredChecks`) and the
transformers callback (`nanlab.integrations.hf.NanMonitorCallback`) are adapters that read
the numbers from their trainer, hand them here, and stop their trainer when `stop` is set.

What the judge needs from the trainer it runs under is passed in explicitly: whether a loss
scaler is active (its skipped steps are not failures), the run's max_steps (a skip streak
running at the end), the named parameters (which module went non-finite) and, to locate a
failure, a `locate(phase, snapshot)` callable that replays the step (locate.replay_step)
and returns a `locate.Located`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nanlab.diagnosis import causes
from nanlab.diagnosis.divergence import DivergenceWatch

POISON = "finite gradients, non-finite parameters after the optimizer step"


@dataclass
class Failure:
    status: str  # nonfinite / diverged
    step: int
    phase: str | None = None  # forward / backward / optimizer
    module: str | None = None
    dtype: str | None = None
    replay_agrees: bool | None = None
    cause: str | None = None  # record.CAUSES
    cause_detail: str | None = None
    cause_value: float | None = None
    grad_frac: float | None = None  # backward: non-finite gradient elements / all
    param_frac: float | None = None  # after the step: non-finite parameter elements / all

    def explain(self, found) -> None:
        self.cause, self.cause_detail, self.cause_value = found or ("unknown", None, None)


@dataclass
class History:
    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)

    def truncate(self, n: int) -> None:
        for k in ("step", "loss", "grad_norm", "lr"):
            del getattr(self, k)[n:]


@dataclass
class Mark:
    """The judge's state at one point of a run (`StepJudge.mark`), to rewind to."""

    steps: int
    max_grad_norm: float
    divergence: DivergenceWatch
    scaler_skips: int
    empty_steps: int
    empty: Failure | None
    skips_in_row: int
    streak: tuple | None


class StepJudge:
    """The per-step decisions, in the order a step makes them: `begin_step`, `loss_fails`
    (forward), `grads_verdict` (backward), `record_step`, `params_fail` (optimizer),
    `watch_divergence`. Two exceptions, both measured rather than assumed:
    - a NaN loss over zero supervised tokens (its gradients are zero, the weights unharmed)
      is recorded (cause empty_targets) and counted, and the run goes on;
    - a non-finite gradient lets that one optimizer step run (clipping, AdamW), so the record
      says how far the poison spread (`note_param_frac`), then stops."""

    def __init__(self, spec, tolerate_nonfinite_grads: bool = False):
        self.spec = spec  # MonitorSpec
        self.tolerate_grads = tolerate_nonfinite_grads  # guard=skip_step handles them
        self.failure: Failure | None = None
        self.empty: Failure | None = None  # the first step whose batch had no target
        self.empty_steps = 0
        self.history = History()
        self.max_grad_norm = 0.0
        self.divergence = DivergenceWatch(spec.diverge_factor, spec.patience, spec.spike_factor)
        self.scaler_skips = 0
        self.failing_batch = None
        self.steps_done: int | None = None  # at the end: the steps an every-step check ran
        self.stop = False  # the adapter stops its trainer when set
        self._skips_in_row = 0
        self._streak: tuple | None = None  # (first step, phase, snapshot) of the skips
        self.begin_step(None)

    @property
    def spikes(self) -> int:
        return self.divergence.spikes

    # state, to rewind to (a weight check made every N steps finds the first bad step
    # after the steps that followed it were judged)
    def mark(self) -> Mark:
        return Mark(
            len(self.history.step),
            self.max_grad_norm,
            copy.copy(self.divergence),
            self.scaler_skips,
            self.empty_steps,
            self.empty,
            self._skips_in_row,
            self._streak,
        )

    def rewind(self, mark: Mark) -> None:
        self.history.truncate(mark.steps)
        self.max_grad_norm, self.divergence = mark.max_grad_norm, copy.copy(mark.divergence)
        self.scaler_skips, self.empty_steps, self.empty = (
            mark.scaler_skips,
            mark.empty_steps,
            mark.empty,
        )
        self._skips_in_row, self._streak = mark.skips_in_row, mark.streak

    # the decisions
    def begin_step(self, snapshot: tuple | None) -> None:
        self._snapshot = snapshot  # (batch, CPU RNG state, progressive flag)
        self._phase: str | None = None  # "forward": guard=skip_step let a NaN loss go on
        self._grad_norm = math.nan  # the history's, NaN until the gradients are seen

    def loss_fails(self, step: int, finite: bool, batch: dict) -> bool:
        if finite:
            return False
        empty = causes.empty_targets_cause(batch)
        if empty is not None:
            # 0/0 over zero targets: NaN loss, zero gradients, weights unharmed; go on
            self.empty_steps += 1
            if self.empty is None:
                self.empty = Failure("nonfinite", step, "forward")
                self.empty.explain(empty)
            return False
        if self.tolerate_grads:
            # guard=skip_step: the gradients will be non-finite too and the guard skips
            # the step; a failure only if it keeps happening (see _skipped)
            self._phase = "forward"
            return False
        return True

    def grads_verdict(self, step: int, total: float, scaler: bool, max_steps: int):
        """None (go on), "backward" (fail at this step), or a skip streak's
        (first step, phase, snapshot) once it is a failure. `scaler`: an fp16 loss scaler
        is active (it skips a step with a non-finite gradient)."""
        self._grad_norm = total
        if math.isfinite(total):
            self.max_grad_norm = max(self.max_grad_norm, total)
            self._skips_in_row = 0
            return None
        if scaler or self.tolerate_grads:
            # fp16: the loss scaler skips this step and lowers its scale; guard=skip_step
            # skips it: their job, not a failure, unless it keeps happening
            self.scaler_skips += bool(scaler)
            return self._skipped(step, self._phase or "backward", max_steps)
        return "backward"

    def _skipped(self, step: int, phase: str, max_steps: int):
        """A step the guard skipped: a run whose every step is skipped from some point on
        only looks alive, so `max_skipped_in_row` skips in a row (or skipping until the end)
        fail it at the first step of the streak."""
        if self._skips_in_row == 0:
            self._streak = (step, phase, self._snapshot)
        self._skips_in_row += 1
        # a streak still running at the last step counts too, but one skipped step at the
        # end is just one skipped step
        last = step + 1 >= (max_steps or 0) and self._skips_in_row > 1
        if self._skips_in_row >= self.spec.max_skipped_in_row or last:
            return self._streak
        return None

    def record_step(self, step: int, loss: float, lr: float) -> None:
        for k, v in (("step", step), ("loss", loss), ("grad_norm", self._grad_norm), ("lr", lr)):
            getattr(self.history, k).append(v)

    def params_fail(self, step: int, named_params, prefix: str = "model.") -> bool:
        """The weights after the optimizer step: a non-finite one from finite gradients is
        a failure of the optimizer step. `named_params`: (name, parameter) pairs; `prefix`
        is left off the module's name."""
        names, params = zip(*named_params) if named_params else ((), ())
        bad = first_nonfinite(params)
        if bad is None:
            return False
        self.failure = Failure(
            "nonfinite",
            step,
            "optimizer",
            names[bad].removeprefix(prefix).rsplit(".", 1)[0],
            str(params[bad].dtype).replace("torch.", ""),
        )
        self.failure.explain(("optimizer_poison", POISON, None))
        self.failure.param_frac = nonfinite_fraction(params)
        self.stop = True
        return True

    def params_fail_unconfirmed(self, step: int) -> None:
        """Non-finite weights were read after `step`, but the re-run made finite ones:
        still a failure, without a module, and the replay disagrees."""
        self.failure = Failure("nonfinite", step, "optimizer", replay_agrees=False)
        self.failure.explain(("optimizer_poison", POISON, None))
        self.stop = True

    def watch_divergence(self, step: int, loss: float) -> None:
        diverged = self.divergence.update(step, loss)
        if diverged is not None:
            self.failure = Failure("diverged", diverged.first_step)
            self.failure.explain(("divergence", diverged.detail, diverged.ratio))
            self.stop = True

    def note_grad_frac(self, grads) -> None:
        assert self.failure is not None  # called on a failure only
        grads = list(grads)
        bad = sum(int((~torch.isfinite(g)).sum()) for g in grads)
        self.failure.grad_frac = bad / max(sum(g.numel() for g in grads), 1)

    def note_param_frac(self, params) -> None:
        assert self.failure is not None  # called on a failure only
        self.failure.param_frac = nonfinite_fraction(params)

    def fail(
        self, phase: str, step: int, snapshot: tuple | None = None, locate: Callable | None = None
    ) -> None:
        """A non-finite failure at `step`: stop, name its cause, and (with `locate`, given
        when spec.locate) locate it by replaying the step of `snapshot` (default: this
        one) on the weights as they are: `locate(phase, snapshot)` -> locate.Located."""
        snapshot = snapshot or self._snapshot
        assert snapshot is not None  # begin_step kept one
        self.failure = Failure("nonfinite", step, phase)
        self.failing_batch = snapshot[0]
        self.stop = True
        found = causes.input_cause(snapshot[0])
        if locate is not None:
            located = locate(phase, snapshot)
            self.failure.module, self.failure.dtype = located.module, located.dtype
            self.failure.replay_agrees = located.agrees
            found = found or located.cause
        if found is None and phase == "backward":
            found = (
                "grad_nonfinite",
                "finite forward and loss, non-finite gradient"
                + (f" first at {self.failure.module}" if self.failure.module else ""),
                None,
            )
        self.failure.explain(found)

    # the record
    def fill_record(
        self,
        record,
        max_attn_logit=None,
        attn_dtype=None,
        guard_fired: int = 0,
        wall_s: float | None = None,
    ) -> None:
        """The outcome fields of `record` (nanlab.record.Record) from the judgement."""
        h = self.history
        finite = [x for x in h.loss if math.isfinite(x)]
        if self.steps_done is not None:
            record.steps_done = self.steps_done
        record.initial_loss = finite[0] if finite else None
        record.final_loss = finite[-1] if finite else None
        record.best_loss = min(finite) if finite else None
        record.max_grad_norm = self.max_grad_norm
        record.max_attn_logit = max_attn_logit
        record.loss_spikes = self.spikes
        record.scaler_skips = self.scaler_skips
        record.guard_fired = guard_fired
        if wall_s is not None:
            record.steps_per_s = round(len(h.step) / max(wall_s, 1e-9), 3)
        record.empty_target_steps = self.empty_steps
        f = self.failure or self.empty  # empty targets: a NaN loss, the run went on
        if f is None:
            first, last = record.initial_loss, record.final_loss
            trained = (
                first is not None and last is not None and last < first * (1 - record.train_margin)
            )
            record.status = "ok" if trained else "stalled"
            record.dtype = attn_dtype
            return
        record.status = f.status
        record.cause, record.cause_detail, record.cause_value = (
            f.cause,
            f.cause_detail,
            f.cause_value,
        )
        record.nonfinite_grad_frac, record.nonfinite_param_frac = f.grad_frac, f.param_frac
        record.first_bad_step = f.step
        if f.status == "nonfinite" and f is self.failure:
            record.steps_done = f.step  # steps 0..k-1 finished finite; step k broke
        record.phase, record.module, record.dtype = f.phase, f.module, f.dtype
        record.replay_agrees = f.replay_agrees

    def history_csv(self) -> str:
        h = self.history
        lines = ["step,loss,grad_norm,lr"] + [
            f"{s},{lo},{g},{lr}" for s, lo, g, lr in zip(h.step, h.loss, h.grad_norm, h.lr)
        ]
        return "\n".join(lines) + "\n"


# --- the checks on tensors ----------------------------------------------------------------------


def grad_norm(grads) -> torch.Tensor | None:
    """The total 2-norm of `grads` (one fused pass: what clip_grad_norm_ computes), on the
    device; None for no gradient at all."""
    grads = list(grads)
    if not grads:
        return None
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())


def params_finite(params) -> torch.Tensor:
    """One device bool: every element of `params` is finite (one fused pass)."""
    return torch.isfinite(torch.stack(torch._foreach_norm(list(params))).float()).all()


def first_nonfinite(params) -> int | None:
    params = list(params)
    if not params:
        return None
    norms = torch.stack(torch._foreach_norm(params)).float()
    bad = ~torch.isfinite(norms)
    return int(bad.nonzero()[0]) if bad.any() else None


def nonfinite_fraction(params) -> float:
    params = list(params)
    bad = sum(int((~torch.isfinite(p)).sum()) for p in params)
    return bad / max(sum(p.numel() for p in params), 1)
