"""The training monitor: cheap checks every step; on the first non-finite value, where and
why; divergence and loss spikes from the loss history.

One job per module:
- the per-step checks and the record they make: `NanMonitor`, here, with `build_callbacks`,
  the one place the monitor and the guards are put in order;
- attention statistics, sampled every `monitor.every` steps: attention_stats.py;
- locating the first non-finite module by replaying the failing step: locate.py;
- the divergence and spike watch over the loss history: divergence.py;
- deferred checking: reading the checks every N steps, re-running kept steps: deferred.py.

The common case pays a handful of reductions per step (loss, gradient norm, parameter
norms). How the host reads them is `monitor.sync_every`:
- sync (1; the default on CPU, where reading costs nothing): each check is read as it is
  made, and a failure is located at once, in the hook that saw it;
- deferred (N > 1; the default on CUDA: 32): the checks stay on the device and the host
  reads them every N steps, at Lightning's logging steps (it waits for the device then
  anyway) and at the end of training. The read walks the steps in order through the same
  decisions as sync mode (the public methods below the hooks); a failure at step k is
  located after re-running the kept steps from the last good state up to k, so the record
  is the same as in sync mode.
The probe and the serving pass import `AttentionStats` and `first_nonfinite_forward` from
here too.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from lightning.pytorch.callbacks import Callback

from nanlab.config.specs import MonitorSpec
from nanlab.diagnosis import causes
from nanlab.diagnosis.attention_stats import AttentionStats, SampledAttention
from nanlab.diagnosis.deferred import DeferredChecks
from nanlab.diagnosis.divergence import DivergenceWatch
from nanlab.diagnosis.locate import first_nonfinite_forward, hooked_backward, replay_step
from nanlab.numerics import guards

__all__ = ["AttentionStats", "Failure", "History", "MonitorSpec", "NanMonitor",
           "build_callbacks", "check_order", "first_nonfinite_forward", "hooked_backward"]

CUDA_SYNC_EVERY = 32  # sync_every=0 on CUDA: one host read per 32 steps


@dataclass
class Failure:
    status: str                  # nonfinite / diverged
    step: int
    phase: str | None = None     # forward / backward / optimizer
    module: str | None = None
    dtype: str | None = None
    replay_agrees: bool | None = None
    cause: str | None = None     # record.CAUSES
    cause_detail: str | None = None
    cause_value: float | None = None
    grad_frac: float | None = None   # backward: non-finite gradient elements / all
    param_frac: float | None = None  # after the step: non-finite parameter elements / all

    def explain(self, found) -> None:
        self.cause, self.cause_detail, self.cause_value = found or ("unknown", None, None)


@dataclass
class History:
    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)


# --- the ordering rule ------------------------------------------------------------------------

def build_callbacks(monitor_spec: MonitorSpec, guard_spec, model) -> tuple[list[Callback],
                                                                            NanMonitor, object]:
    """(callbacks, monitor, guard): the monitor and the guard's callbacks in the one order
    that works (`check_order`); the monitor; the guard's object, whose `.fired` counts its
    interventions (None: guard=none). The monitor is given the guard: deferred mode puts
    `.fired` back after re-running steps. Precision and other callbacks go after these; the
    record's steps_done is `monitor.steps_done` (a deferred run trains past a failure until
    its read: trainer.global_step counts those steps too)."""
    guard_callbacks, guard = guards.build_guard(guard_spec, model)
    monitor = NanMonitor(monitor_spec, tolerate_nonfinite_grads=guard_spec.name == "skip_step",
                         guard=guard)
    callbacks = [monitor, *guard_callbacks]
    check_order(callbacks)
    return callbacks, monitor, guard


def check_order(callbacks) -> None:
    """The monitor must come before guard=skip_step's callback. Lightning runs
    on_before_optimizer_step in list order, and SkipNonFiniteStep sets every gradient of a
    step with a non-finite one to None: a monitor after it would see no gradient (norm 0),
    count no skipped step and never call a streak of skipped steps a failure."""
    monitor = next((i for i, c in enumerate(callbacks) if isinstance(c, NanMonitor)), None)
    dropper = next((i for i, c in enumerate(callbacks)
                    if isinstance(c, guards.SkipNonFiniteStep)), None)
    if monitor is not None and dropper is not None and dropper < monitor:
        raise ValueError("callbacks: NanMonitor must come before SkipNonFiniteStep (it must see "
                         "the gradients before guard=skip_step drops them)")


# --- the callback ------------------------------------------------------------------------------

class NanMonitor(Callback):
    """Checks every step; on the first non-finite value, locates it, names its cause and
    stops cleanly. Two exceptions, both measured rather than assumed:
    - a NaN loss over zero supervised tokens (its gradients are zero, the weights unharmed)
      is recorded (cause empty_targets) and counted, and the run goes on;
    - a non-finite gradient lets that one optimizer step run (clipping, AdamW), so the record
      says how far the poison spread (nonfinite_param_frac), then stops."""

    def __init__(self, spec: MonitorSpec, tolerate_nonfinite_grads: bool = False, guard=None):
        self.spec = spec
        self.tolerate_grads = tolerate_nonfinite_grads  # guard=skip_step handles them
        self.guard = guard  # deferred mode puts its .fired back after re-running steps
        self.failure: Failure | None = None
        self.empty: Failure | None = None    # the first step whose batch had no target
        self.empty_steps = 0
        self.history = History()
        self.max_grad_norm = 0.0
        self.divergence = DivergenceWatch(spec.diverge_factor, spec.patience, spec.spike_factor)
        self.scaler_skips = 0
        self.failing_batch = None
        self.started = time.time()
        self.steps_done: int | None = None  # at the end: the steps sync mode ran
        self.sync_every = spec.sync_every   # resolved (0: auto) when training starts
        self.attention: SampledAttention | None = None  # from the start of training
        self.deferred: DeferredChecks | None = None     # deferred mode, until a failure
        self._skips_in_row = 0
        self._streak: tuple | None = None   # (first step, phase, snapshot) of the skips
        self._poisoned = False
        self.begin_step(None)

    # what the runner reads
    @property
    def spikes(self) -> int:
        return self.divergence.spikes

    @property
    def max_attn_logit(self) -> float | None:
        return self.attention.max_logit if self.attention else None

    @property
    def attn_dtype(self) -> str | None:
        return self.attention.dtype if self.attention else None

    # the hooks, in the order Lightning calls them in a step
    def on_train_start(self, trainer, pl_module):
        check_order(trainer.callbacks)
        self.attention = SampledAttention(pl_module.model, self.spec.every)
        self.started = time.time()
        cuda = pl_module.device.type == "cuda"
        self.sync_every = self.spec.sync_every or (
            CUDA_SYNC_EVERY if cuda and _snapshot_fits(pl_module) else 1)
        if self.spec.enabled and self.sync_every > 1:
            self.deferred = DeferredChecks(self, trainer, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # what the replay needs to redo this step: batch, RNG, and progressive's precision
        self.begin_step((batch, torch.get_rng_state(),
                         getattr(trainer.precision_plugin, "active", None)))
        if self.deferred:
            self.deferred.keep(trainer.global_step, self._snapshot)
        if self.spec.enabled:
            self.attention.start(trainer.global_step)

    # forward: the loss
    def on_before_backward(self, trainer, pl_module, loss):
        if not self.spec.enabled or self.failure is not None:
            return
        finite = torch.isfinite(loss.detach()).all()
        if self.deferred:
            self.deferred.note_loss(finite)
        elif self.loss_fails(trainer.global_step, bool(finite), self._snapshot[0]):
            self.attention.close(trainer, deferred=False)
            self.fail(trainer, pl_module, "forward")

    # backward: gradients (already unscaled by the fp16 loss scaler), before clipping
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not self.spec.enabled:
            return
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if self.failure is not None:
            for p in params:
                p.grad = None  # keep the weights of the failing step for replay
            return
        # no gradient at all (everything frozen, or dropped before this hook): norm 0
        norms = torch._foreach_norm([p.grad for p in params]) if params else []
        total = torch.linalg.vector_norm(torch.stack(norms).float()) if norms else None
        if total is not None and all(p.grad.dtype == torch.float32 and p.grad.device == total.device
                                     for p in params):
            pl_module.grad_norm_seen = ([p.grad for p in params], total)  # clipping reuses it
        if self.deferred:
            self.deferred.note_grads(total, optimizer,
                                     getattr(trainer.precision_plugin, "active", None))
            if trainer.loggers:  # Lightning's log() costs ~1 ms a call: only where it goes somewhere
                pl_module.log("train/grad_norm", total if total is not None else 0.0,
                              batch_size=1)
            return
        total = total.item() if total is not None else 0.0
        if trainer.loggers:
            pl_module.log("train/grad_norm", total, batch_size=1)
        verdict = self.grads_verdict(trainer, trainer.global_step, total)
        if verdict == "backward":
            self.fail(trainer, pl_module, "backward")
            self.note_grad_frac(params)
            self._poisoned = True  # let clipping and AdamW run once: measure the spread
        elif verdict is not None:  # a streak of skipped steps, located at its first step
            step, phase, snapshot = verdict
            self.fail(trainer, pl_module, phase, step=step, snapshot=snapshot)

    # optimizer: parameters, loss history, divergence
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.attention.close(trainer, deferred=self.deferred is not None)
        if not self.spec.enabled:
            return
        step = trainer.global_step - 1  # the step that just ran
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        if self.deferred:
            self.deferred.end_step(trainer, pl_module, outputs, lr)
            return
        loss = float(outputs["loss"]) if outputs is not None else math.nan
        self.record_step(step, loss, lr)
        if self._poisoned:
            self._poisoned = False
            self.note_param_frac(pl_module)
        if self.failure is not None:
            trainer.should_stop = True
            return
        if self.spec.check_params and self.params_fail(trainer, pl_module, step):
            return
        if math.isfinite(loss):
            self.watch_divergence(trainer, step, loss)

    def on_train_end(self, trainer, pl_module):
        if self.deferred:
            self.deferred.read(trainer, pl_module)
        if self.steps_done is None:
            self.steps_done = trainer.global_step

    # the decisions, shared by the hooks (sync mode) and DeferredChecks.read (deferred mode)
    def begin_step(self, snapshot: tuple | None) -> None:
        self._snapshot = snapshot  # (batch, CPU RNG state, progressive flag)
        self._phase: str | None = None  # "forward": guard=skip_step let a NaN loss go on
        self._grad_norm = math.nan      # the history's, NaN until the gradients are seen

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

    def grads_verdict(self, trainer, step: int, total: float):
        """None (go on), "backward" (fail at this step), or a skip streak's
        (first step, phase, snapshot) once it is a failure."""
        self._grad_norm = total
        if math.isfinite(total):
            self.max_grad_norm = max(self.max_grad_norm, total)
            self._skips_in_row = 0
            return None
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None or self.tolerate_grads:
            # fp16: the loss scaler skips this step and lowers its scale; guard=skip_step
            # skips it: their job, not a failure, unless it keeps happening
            self.scaler_skips += scaler is not None
            return self._skipped(trainer, step, self._phase or "backward")
        return "backward"

    def _skipped(self, trainer, step: int, phase: str):
        """A step the guard skipped: a run whose every step is skipped from some point on
        only looks alive, so `max_skipped_in_row` skips in a row (or skipping until the end)
        fail it at the first step of the streak."""
        if self._skips_in_row == 0:
            self._streak = (step, phase, self._snapshot)
        self._skips_in_row += 1
        # a streak still running at the last step counts too, but one skipped step at the
        # end is just one skipped step
        last = step + 1 >= (trainer.max_steps or 0) and self._skips_in_row > 1
        if self._skips_in_row >= self.spec.max_skipped_in_row or last:
            return self._streak
        return None

    def record_step(self, step: int, loss: float, lr: float) -> None:
        for k, v in (("step", step), ("loss", loss), ("grad_norm", self._grad_norm), ("lr", lr)):
            getattr(self.history, k).append(v)

    def params_fail(self, trainer, pl_module, step: int) -> bool:
        """The weights after the optimizer step: a non-finite one from finite gradients is
        a failure of the optimizer step."""
        params = list(pl_module.parameters())
        norms = torch.stack(torch._foreach_norm(params)).float()
        if torch.isfinite(norms).all():
            return False
        i = int((~torch.isfinite(norms)).nonzero()[0])
        name = [n for n, _ in pl_module.named_parameters()][i]
        self.failure = Failure("nonfinite", step, "optimizer",
                               name.removeprefix("model.").rsplit(".", 1)[0],
                               str(params[i].dtype).replace("torch.", ""))
        self.failure.explain(("optimizer_poison", _POISON, None))
        self.failure.param_frac = _nonfinite_fraction(params)
        trainer.should_stop = True
        return True

    def params_fail_unconfirmed(self, trainer, step: int) -> None:
        """Deferred mode read non-finite weights after `step`, but its re-run made finite
        ones: still a failure, without a module, and the replay disagrees."""
        self.failure = Failure("nonfinite", step, "optimizer", replay_agrees=False)
        self.failure.explain(("optimizer_poison", _POISON, None))
        trainer.should_stop = True

    def watch_divergence(self, trainer, step: int, loss: float) -> None:
        diverged = self.divergence.update(step, loss)
        if diverged is not None:
            self.failure = Failure("diverged", diverged.first_step)
            self.failure.explain(("divergence", diverged.detail, diverged.ratio))
            trainer.should_stop = True

    def note_grad_frac(self, params) -> None:
        bad = sum(int((~torch.isfinite(p.grad)).sum()) for p in params)
        self.failure.grad_frac = bad / max(sum(p.grad.numel() for p in params), 1)

    def note_param_frac(self, pl_module) -> None:
        self.failure.param_frac = _nonfinite_fraction(pl_module.parameters())

    def fail(self, trainer, pl_module, phase, step: int | None = None, snapshot=None):
        """A non-finite failure at `step` (default: this one): stop, and locate it by
        replaying the step of `snapshot` (default: this one) on the weights as they are."""
        step = trainer.global_step if step is None else step
        snapshot = snapshot or self._snapshot
        self.failure = Failure("nonfinite", step, phase)
        self.failing_batch = snapshot[0]
        trainer.should_stop = True
        found = causes.input_cause(snapshot[0])
        if self.spec.locate:
            stats = self.attention.stats
            located = replay_step(pl_module, trainer.precision_plugin, phase, snapshot, stats)
            self.attention.count_logits(stats.summary())  # the failing step's logits count
            self.failure.module, self.failure.dtype = located.module, located.dtype
            self.failure.replay_agrees = located.agrees
            found = found or located.cause
        if found is None and phase == "backward":
            found = ("grad_nonfinite", "finite forward and loss, non-finite gradient"
                     + (f" first at {self.failure.module}" if self.failure.module else ""), None)
        self.failure.explain(found)


_POISON = "finite gradients, non-finite parameters after the optimizer step"


def _snapshot_fits(pl_module) -> bool:
    """auto on CUDA: deferred checks keep a snapshot of ~3x the trainable weights (weights
    and AdamW's two moments, src/deferred.py), and AdamW has not allocated its own 2x yet
    when training starts: defer only where the device has room for both with a margin, else
    read every step as on CPU (a full fine-tune filling the GPU must not go out of memory
    for the sake of a faster check)."""
    trainable = sum(p.numel() * p.element_size() for p in pl_module.parameters()
                    if p.requires_grad)
    free, _ = torch.cuda.mem_get_info(pl_module.device)
    fits = free >= 6 * trainable
    if not fits:
        print(f"monitor: reading its checks every step (sync_every=1): deferred checks need "
              f"~{3 * trainable / 2**30:.1f} GiB for their snapshot, {free / 2**30:.1f} GiB "
              "is free; monitor.sync_every=N forces them")
    return fits


def _nonfinite_fraction(params) -> float:
    params = list(params)
    bad = sum(int((~torch.isfinite(p)).sum()) for p in params)
    return bad / max(sum(p.numel() for p in params), 1)
