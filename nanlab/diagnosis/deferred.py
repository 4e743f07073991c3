"""Deferred checking (`monitor.sync_every` N > 1, the default on CUDA): the monitor's
per-step checks stay on the device and the host reads them every N steps.

Why: on a GPU every host read of a device value (`.item()`, `float()`, `if tensor`) waits
for all the work queued before it; sync mode makes a few such reads every step.

How: each step's checks (loss finite, total gradient norm, weights finite, the loss) are
stacked into one device tensor per step (KeptStep.values). The host reads them every N
steps, at Lightning's logging steps (Lightning waits for the device there anyway) and at
the end of training, and walks the steps in order through the monitor's own decisions, as
sync mode took them step by step (`DeferredChecks.read`). Training went on past a failure
until the read, so where a decision needs the training state of the failing step (to
locate it, or to measure its gradients and weights), the window puts back the snapshot of
the last good read and re-runs the kept steps up to it, as Lightning ran them: the same
batches, RNG states, precision, learning rates, loss scale, clipping and guard=skip_step
(`StepWindow.rerun`). The record comes out as sync mode's: same status, step, phase,
module, cause, fractions, maxima and history. The steps a deferred run trained past a
failure are not in the history; `NanMonitor.steps_done` counts the steps sync mode ran.

Memory, while N > 1: the snapshot is a copy, on the device, of every trainable parameter
and of the optimizer state (AdamW: two moments per parameter), about 3x the trainable
weights' bytes (LoRA: the adapters only), plus the fp16 loss scale; the window holds up
to N batches (already on the device; pixel values are most of a batch), their RNG states
(5 KiB each) and a few device scalars per step. The snapshot is retaken every N steps, one
device-to-device copy of that size. sync_every=1 keeps none of it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from nanlab.diagnosis.judge import params_finite
from nanlab.diagnosis.locate import backward_context
from nanlab.numerics.guards import SkipNonFiniteStep


@dataclass
class KeptStep:
    """One training step, as deferred checking keeps it until its checks are read."""

    step: int
    snapshot: tuple  # (batch, CPU RNG state, progressive flag): what the
    #                                  locate replay takes, as sync mode keeps it
    cuda_rng: torch.Tensor | None = None
    active: bool | None = None  # progressive: the precision the step really ran in
    lrs: list[float] = field(default_factory=list)  # each parameter group's lr for the update
    has_grads: bool = False  # on_before_optimizer_step ran for this step
    loss_ok: torch.Tensor | None = None  # device: the loss before backward is finite
    grad_norm: torch.Tensor | None = None  # device: total gradient norm, before clipping
    values: Any = None  # device: (loss_ok, grad_norm, params_ok, loss)
    lr: float = math.nan  # history's lr: group 0's after the scheduler stepped
    guard_fired: int | None = None  # the guard's count at the end of the step
    mark: Any = None  # WeightWindow: the judge's state after the step

    def close(self, loss: torch.Tensor, params_ok: torch.Tensor | None) -> None:
        """Stack the step's device values into one tensor (read later in one go)."""
        one = torch.ones((), dtype=torch.float64, device=loss.device)
        parts = [
            self.loss_ok if self.loss_ok is not None else one,
            self.grad_norm if self.grad_norm is not None else one * math.nan,
            params_ok if params_ok is not None else one,
            loss,
        ]
        self.values = torch.stack([p.to(device=loss.device, dtype=torch.float64) for p in parts])
        self.loss_ok = self.grad_norm = None


class StepWindow:
    """The kept steps since the snapshot, and how to re-run them."""

    def __init__(self, trainer, pl_module, skip_nonfinite_steps: bool):
        self.trainer = trainer
        self.module = pl_module
        self.skip_nonfinite_steps = skip_nonfinite_steps  # guard=skip_step: redo its skips
        self.cuda = pl_module.device.type == "cuda"
        self.kept: list[KeptStep] = []
        self.read_upto = 0  # kept[:read_upto] have been read and judged
        self.restart()

    @property
    def optimizer(self):
        return self.trainer.optimizers[0]

    @property
    def plugin(self):
        return self.trainer.precision_plugin

    @property
    def scaler(self):
        return getattr(self.plugin, "scaler", None)

    # keeping -----------------------------------------------------------------------------

    def restart(self) -> None:
        """Snapshot the training state as it is now, the start of the next step, and forget
        the kept steps. Device copies only: nothing here waits for the device."""
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        # into the last snapshot's buffers where they fit: a fresh copy of this size every
        # N steps costs more in page faults (CPU) and allocation than the copy itself
        old = getattr(self, "weights", None)
        if old is not None and len(old) == len(self.params):
            self.weights = [_copy_into(p.detach(), w) for p, w in zip(self.params, old)]
        else:
            self.weights = [p.detach().clone() for p in self.params]
        self.optimizer_state = _copy_into(
            self.optimizer.state_dict(), getattr(self, "optimizer_state", None)
        )
        scaler = self.scaler
        self.scale = None
        if scaler is not None and scaler._scale is not None:
            self.scale = (scaler._scale.clone(), scaler._growth_tracker.clone())
        self.kept = []
        self.read_upto = 0

    def keep(self, step: int, snapshot: tuple) -> KeptStep:
        kept = KeptStep(step, snapshot, torch.cuda.get_rng_state() if self.cuda else None)
        self.kept.append(kept)
        return kept

    @property
    def current(self) -> KeptStep:
        return self.kept[-1]

    def read(self) -> list[tuple[KeptStep, list[float]]]:
        """The unread steps and their values; the host waits for the device here, once."""
        unread = self.kept[self.read_upto :]
        self.read_upto = len(self.kept)
        if not unread:
            return []
        rows = torch.stack([s.values for s in unread]).tolist()
        return list(zip(unread, rows))

    # re-running ----------------------------------------------------------------------------

    def rerun(self, upto: int, gradients: bool = False) -> None:
        """Put the snapshot back and redo the kept steps before step `upto`; with
        `gradients`, also step `upto`'s forward and backward, leaving its (unscaled)
        gradients in .grad for the caller (`finish` completes the step). The RNG state and
        the precision flag are as they were before, afterwards."""
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state() if self.cuda else None
        active = getattr(self.plugin, "active", None)
        self._restore()
        try:
            for kept in self.kept:
                if kept.step >= upto:
                    break
                self._forward_backward(kept)
                self.finish(kept)
            if gradients:
                self._forward_backward(next(k for k in self.kept if k.step == upto))
        finally:
            torch.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng)
            if active is not None:
                self.plugin.active = active

    def _restore(self) -> None:
        with torch.no_grad():
            for p, w in zip(self.params, self.weights):
                p.copy_(w)
        self.optimizer.load_state_dict(copy.deepcopy(self.optimizer_state))
        scaler = self.scaler
        if scaler is not None:
            # None: the scaler had not scaled yet and starts from its initial scale again
            scale, tracker = self.scale or (None, None)
            scaler._scale = scale.clone() if scale is not None else None
            scaler._growth_tracker = tracker.clone() if tracker is not None else None
            scaler._per_optimizer_states.clear()

    def _forward_backward(self, kept: KeptStep) -> None:
        """Lightning's closure: training_step's loss, then backward through the precision
        plugin (the fp16 loss scaler scales, then unscales before the callbacks)."""
        batch, rng, _ = kept.snapshot
        torch.set_rng_state(rng)
        if kept.cuda_rng is not None:
            torch.cuda.set_rng_state(kept.cuda_rng)
        if kept.active is not None:
            self.plugin.active = kept.active
        self.optimizer.zero_grad(set_to_none=True)
        with self.plugin.train_step_context():
            loss = self.module.compute_loss(batch)
        scaler = self.scaler
        with backward_context(self.plugin):
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.unscale_(self.optimizer)

    def finish(self, kept: KeptStep) -> None:
        """The rest of a step after the callbacks: guard=skip_step, clipping, the update
        at the step's learning rates (the scheduler is not stepped: its lrs were kept)."""
        optimizer = self.optimizer
        if self.skip_nonfinite_steps:
            SkipNonFiniteStep().on_before_optimizer_step(None, None, optimizer)  # not the
            #   run's guard: its count is the live run's, put back by the monitor
        self.module.configure_gradient_clipping(
            optimizer,
            gradient_clip_val=self.trainer.gradient_clip_val,
            gradient_clip_algorithm=self.trainer.gradient_clip_algorithm,
        )
        for group, lr in zip(optimizer.param_groups, kept.lrs):
            group["lr"] = lr
        scaler = self.scaler
        if scaler is not None:
            scaler.step(optimizer)  # skips the update on a non-finite gradient, as live
            scaler.update()
        else:
            optimizer.step()


class DeferredChecks:
    """NanMonitor's checks in deferred mode: the hooks leave device values here, and
    `read` judges them with the monitor's decisions."""

    def __init__(self, monitor, trainer, pl_module):
        self.monitor = monitor
        self.window = StepWindow(trainer, pl_module, monitor.judge.tolerate_grads)
        self.every = monitor.sync_every

    # from the monitor's hooks, every step: nothing here waits for the device
    def keep(self, step: int, snapshot: tuple) -> None:
        self.window.keep(step, snapshot)

    def note_loss(self, finite: torch.Tensor) -> None:
        self.window.current.loss_ok = finite

    def note_grads(self, total: torch.Tensor | None, optimizer, active) -> None:
        kept = self.window.current
        kept.has_grads, kept.grad_norm, kept.active = True, total, active
        kept.lrs = [g["lr"] for g in optimizer.param_groups]

    def end_step(self, trainer, pl_module, outputs, lr: float) -> None:
        """The step's last checks, then a read when one is due."""
        kept = self.window.current
        kept.lr = lr
        kept.guard_fired = getattr(self.monitor.guard, "fired", None)
        if outputs is not None:
            loss = outputs["loss"].detach()
        else:
            loss = torch.full((), math.nan, device=pl_module.device)
        params_ok = None
        if self.monitor.spec.check_params:
            params_ok = params_finite(pl_module.parameters())
        kept.close(loss, params_ok)
        boundary = (kept.step + 1) % self.every == 0
        if boundary or _logger_reads_now(trainer):
            self.read(trainer, pl_module, restart=boundary)

    # the read
    def read(self, trainer, pl_module, restart: bool = False) -> None:
        """Judge the unread steps in order; on a failure stop training, else (`restart`)
        snapshot the state as the last good one."""
        monitor = self.monitor
        stop = None
        for kept, (loss_ok, grad_norm, params_ok, loss) in self.window.read():
            self._judge(trainer, pl_module, kept, loss_ok == 1.0, grad_norm, params_ok == 1.0, loss)
            if monitor.judge.failure is not None:
                stop = kept.step
                break
        monitor.attention.count_up_to(stop)  # sampled steps after a failure never ran in sync
        if stop is not None:
            monitor.judge.steps_done = stop + 1  # sync mode stopped after this step
            trainer.should_stop = True
            monitor.deferred = None  # nothing more to check; the kept state is let go
        elif restart:
            self.window.restart()

    def _judge(
        self,
        trainer,
        pl_module,
        kept: KeptStep,
        loss_ok: bool,
        grad_norm: float,
        params_ok: bool,
        loss: float,
    ) -> None:
        """One step through the judge's decisions, in sync mode's order (the hooks
        on_before_backward, on_before_optimizer_step, on_train_batch_end). Locating goes
        through the monitor (`fail`: the replay needs Lightning's module and plugin)."""
        monitor, judge, t = self.monitor, self.monitor.judge, kept.step
        judge.begin_step(kept.snapshot)
        if judge.loss_fails(t, loss_ok, kept.snapshot[0]):
            self._rerun(kept, upto=t)
            monitor.fail(trainer, pl_module, "forward", step=t)
        elif kept.has_grads:
            verdict = monitor.grads_verdict(trainer, t, grad_norm)
            if verdict is not None:
                # sync mode located mid-step: the replay's attention statistics replaced
                # the step's own
                monitor.attention.drop(t)
            if verdict == "backward":
                self._rerun(kept, upto=t, gradients=True)
                monitor.fail(trainer, pl_module, "backward", step=t)
                optimizer = trainer.optimizers[0]
                judge.note_grad_frac(
                    [
                        p.grad
                        for g in optimizer.param_groups
                        for p in g["params"]
                        if p.grad is not None
                    ]
                )
                self.window.finish(kept)  # the poisoned update, as sync mode let it run
                judge.note_param_frac(pl_module.parameters())
            elif verdict is not None:
                step, phase, snapshot = verdict
                self._rerun(kept, upto=t)
                monitor.fail(trainer, pl_module, phase, step=step, snapshot=snapshot)
        judge.record_step(t, loss, kept.lr)
        if judge.failure is not None:
            return
        if monitor.spec.check_params and not params_ok:
            self._rerun(kept, upto=t + 1)
            if not judge.params_fail(t, list(pl_module.named_parameters())):
                judge.params_fail_unconfirmed(t)
            trainer.should_stop = True
            return
        if math.isfinite(loss):
            judge.watch_divergence(t, loss)
            if judge.stop:
                trainer.should_stop = True

    def _rerun(self, kept: KeptStep, upto: int, gradients: bool = False) -> None:
        self.window.rerun(upto, gradients)
        guard = self.monitor.guard
        if guard is not None and kept.guard_fired is not None:
            # the re-run fired the guard again: back to the live count at the step's end
            guard.fired = kept.guard_fired


class WeightWindow:
    """Sync mode's weight check every `every` steps (monitor.PARAMS_EVERY): the steps since
    the last good check, kept as deferred mode keeps them (a StepWindow: the snapshot of the
    weights, optimizer state and loss scale at its start, each step's batch, RNG states,
    precision flag and learning rates) with the judge's state after each step. When a check
    finds a non-finite weight, `first_bad` re-runs the kept steps from the snapshot and
    checks the weights after each: the step an every-step check would have failed. That
    holds because a non-finite weight stays non-finite (AdamW, SGD and StableAdamW only add
    to and scale a weight: inf and NaN survive both) until someone writes the weights.

    Cost: one pass over the weights per check (not per step), and the snapshot, retaken at
    every good check: a copy of the trainable weights and the optimizer state (~3x the
    trainable weights' bytes, held in memory)."""

    def __init__(self, trainer, pl_module, skip_nonfinite_steps: bool, every: int):
        self.window = StepWindow(trainer, pl_module, skip_nonfinite_steps)
        self.every = every
        self.done: list[KeptStep] = []  # the kept steps that finished, in order

    def keep(self, step: int, snapshot: tuple) -> None:
        self.window.keep(step, snapshot)

    def note_grads(self, optimizer, active) -> None:
        kept = self.window.current
        kept.has_grads, kept.active = True, active
        kept.lrs = [g["lr"] for g in optimizer.param_groups]

    def end_step(self, mark, guard_fired: int | None) -> None:
        kept = self.window.current
        kept.mark, kept.guard_fired = mark, guard_fired
        self.done.append(kept)

    @property
    def unchecked(self) -> bool:
        return bool(self.done)

    def due(self, step: int) -> bool:
        return (step + 1) % self.every == 0

    def restart(self) -> None:
        self.window.restart()
        self.done = []

    def first_bad(self) -> KeptStep | None:
        """Re-run the finished kept steps from the snapshot, checking the weights after
        each; the first step whose update left a non-finite weight (the model is left as
        that update left it), or None. Between steps only: never inside a live step's
        autograd graph. The RNG state and precision flag are put back afterwards."""
        w = self.window
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state() if w.cuda else None
        active = getattr(w.plugin, "active", None)
        w._restore()
        try:
            for kept in self.done:
                w._forward_backward(kept)
                w.finish(kept)
                if not bool(params_finite(w.module.parameters())):
                    return kept
            return None
        finally:
            torch.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng)
            if active is not None:
                w.plugin.active = active


def _copy_into(value, into):
    """A copy of `value` (a state dict's nesting of dicts, lists and tensors), written into
    the tensors of `into` (an earlier copy) where shape, dtype and device match."""
    if isinstance(value, torch.Tensor):
        if (
            isinstance(into, torch.Tensor)
            and into.shape == value.shape
            and into.dtype == value.dtype
            and into.device == value.device
        ):
            return into.copy_(value)
        return value.detach().clone()
    if isinstance(value, dict):
        into = into if isinstance(into, dict) else {}
        return {k: _copy_into(v, into.get(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        into = (
            into
            if isinstance(into, (list, tuple)) and len(into) == len(value)
            else [None] * len(value)
        )
        return type(value)(_copy_into(v, i) for v, i in zip(value, into))
    return copy.deepcopy(value)


def _logger_reads_now(trainer) -> bool:
    """Lightning reads the logged metrics on the host at its logging steps: reading the
    checks there too costs no extra wait."""
    if not trainer.loggers:
        return False
    try:
        return bool(trainer._logger_connector.should_update_logs)
    except AttributeError:
        return False
