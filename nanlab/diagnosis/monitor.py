"""The Lightning training monitor: a thin adapter from Lightning's hooks to the step judge.

One job per module:
- the judgement of a step (is the loss finite? the gradients? the weights? which failure,
  which cause?) and the record it makes: judge.py, framework-free, shared with the
  transformers callback (nanlab/integrations/hf.py);
- this module: `NanMonitor`, the Lightning callback that reads a step's numbers in its
  hooks and hands them to the judge, with `build_callbacks`, the one place the monitor and
  the guards are put in order;
- attention statistics, sampled every `monitor.every` steps: attention_stats.py;
- locating the first non-finite module by replaying the failing step: locate.py;
- the divergence and spike watch over the loss history: divergence.py;
- deferred checking: reading the checks every N steps, re-running kept steps: deferred.py.

The common case pays a handful of reductions per step (loss, gradient norm). How the host
reads them is `monitor.sync_every`:
- sync (1; the default on CPU, where reading costs nothing): each check is read as it is
  made, and a failure is located at once, in the hook that saw it. The weights are checked
  every `PARAMS_EVERY` steps (one pass over every parameter: ~4 ms of a ~160 ms tiny-model
  step on CPU, the monitor's largest cost), at the end, and before any other failure is
  called; a check that finds a non-finite weight re-runs the steps since the last good
  check from a snapshot (deferred.WeightWindow) to find the exact first bad step, and the
  judge is rewound to it, so the record is the every-step check's (tests/test_deferred.py);
- deferred (N > 1; the default on CUDA: 32): the checks stay on the device and the host
  reads them every N steps, at Lightning's logging steps (it waits for the device then
  anyway) and at the end of training. The read walks the steps in order through the same
  judge as sync mode; a failure at step k is located after re-running the kept steps from
  the last good state up to k, so the record is the same as in sync mode.
"""

from __future__ import annotations

import math
import time

import torch
from lightning.pytorch.callbacks import Callback

from nanlab.config.specs import MonitorSpec
from nanlab.diagnosis import judge as judging
from nanlab.diagnosis.attention_stats import SampledAttention
from nanlab.diagnosis.deferred import DeferredChecks, WeightWindow
from nanlab.diagnosis.judge import Failure, History, StepJudge
from nanlab.diagnosis.locate import hooked_backward, replay_step
from nanlab.numerics import guards

__all__ = [
    "Failure",
    "History",
    "MonitorSpec",
    "NanMonitor",
    "build_callbacks",
    "check_order",
    "hooked_backward",
]

CUDA_SYNC_EVERY = 32  # sync_every=0 on CUDA: one host read per 32 steps
# sync mode off CUDA: the weights are checked every this many steps (1: every step, as
# before; the record is the same either way, tests/test_deferred.py). On CUDA sync mode
# (the snapshot did not fit) they are checked every step: the window needs that snapshot.
PARAMS_EVERY = 32

# what the runner and the tests read from the monitor: the judge's
_JUDGED = (
    "failure",
    "empty",
    "empty_steps",
    "history",
    "max_grad_norm",
    "divergence",
    "scaler_skips",
    "failing_batch",
    "steps_done",
    "spikes",
    "tolerate_grads",
    "_skips_in_row",
    "_streak",
    "_grad_norm",
    "_snapshot",
)


# --- the ordering rule ------------------------------------------------------------------------


def build_callbacks(
    monitor_spec: MonitorSpec, guard_spec, model
) -> tuple[list[Callback], NanMonitor, object]:
    """(callbacks, monitor, guard): the monitor and the guard's callbacks in the one order
    that works (`check_order`); the monitor; the guard's object, whose `.fired` counts its
    interventions (None: guard=none). The monitor is given the guard: deferred mode puts
    `.fired` back after re-running steps. Precision and other callbacks go after these; the
    record's steps_done is `monitor.steps_done` (a deferred run trains past a failure until
    its read: trainer.global_step counts those steps too)."""
    guard_callbacks, guard = guards.build_guard(guard_spec, model)
    monitor = NanMonitor(
        monitor_spec, tolerate_nonfinite_grads=guard_spec.name == "skip_step", guard=guard
    )
    callbacks = [monitor, *guard_callbacks]
    check_order(callbacks)
    return callbacks, monitor, guard


def check_order(callbacks) -> None:
    """The monitor must come before guard=skip_step's callback. Lightning runs
    on_before_optimizer_step in list order, and SkipNonFiniteStep sets every gradient of a
    step with a non-finite one to None: a monitor after it would see no gradient (norm 0),
    count no skipped step and never call a streak of skipped steps a failure."""
    monitor = next((i for i, c in enumerate(callbacks) if isinstance(c, NanMonitor)), None)
    dropper = next(
        (i for i, c in enumerate(callbacks) if isinstance(c, guards.SkipNonFiniteStep)), None
    )
    if monitor is not None and dropper is not None and dropper < monitor:
        raise ValueError(
            "callbacks: NanMonitor must come before SkipNonFiniteStep (it must see "
            "the gradients before guard=skip_step drops them)"
        )


# --- the callback ------------------------------------------------------------------------------


class NanMonitor(Callback):
    """Checks every step; on the first non-finite value, locates it, names its cause and
    stops cleanly (the decisions: judge.StepJudge). For a LightningModule of your own:
    `NanMonitor.for_lightning(...)` (nanlab/integrations/lightning.py)."""

    def __init__(
        self,
        spec: MonitorSpec,
        tolerate_nonfinite_grads: bool = False,
        guard=None,
        params_every: int | None = None,
    ):
        self.spec = spec
        self.judge = StepJudge(spec, tolerate_nonfinite_grads)
        self.guard = guard  # deferred mode puts its .fired back after re-running steps
        self.params_every = params_every  # None: PARAMS_EVERY off CUDA, read at the start
        self.started = time.time()
        self.sync_every = spec.sync_every  # resolved (0: auto) when training starts
        self.attention: SampledAttention | None = None  # from the start of training
        self.deferred: DeferredChecks | None = None  # deferred mode, until a failure
        self.weights: WeightWindow | None = None  # sync mode, weights every N steps
        self._poisoned = False
        self._pending = False  # a non-finite weight seen mid-step: located at the step's end
        self._rewound = False  # the weight check found an earlier step: this one never ran

    @classmethod
    def for_lightning(cls, out_dir=None, every: int = 10, **options):
        """A monitor for any LightningModule, without Hydra: see
        nanlab.integrations.lightning.nan_monitor."""
        from nanlab.integrations.lightning import nan_monitor

        return nan_monitor(out_dir=out_dir, every=every, **options)

    def __getattr__(self, name):
        if name in _JUDGED and "judge" in self.__dict__:
            return getattr(self.__dict__["judge"], name)
        raise AttributeError(name)

    def __setattr__(self, name, value):
        if name in _JUDGED:
            setattr(self.judge, name, value)
        else:
            super().__setattr__(name, value)

    @property
    def max_attn_logit(self) -> float | None:
        return self.attention.max_logit if self.attention else None

    @property
    def attn_dtype(self) -> str | None:
        return self.attention.dtype if self.attention else None

    def _stop(self, trainer) -> None:
        if self.judge.stop:
            trainer.should_stop = True

    # the hooks, in the order Lightning calls them in a step
    def on_train_start(self, trainer, pl_module):
        check_order(trainer.callbacks)
        self.attention = SampledAttention(pl_module.model, self.spec.every)
        self.started = time.time()
        cuda = pl_module.device.type == "cuda"
        self.sync_every = self.spec.sync_every or (
            CUDA_SYNC_EVERY if cuda and _snapshot_fits(pl_module) else 1
        )
        if self.spec.enabled and self.sync_every > 1:
            self.deferred = DeferredChecks(self, trainer, pl_module)
        every = (
            self.params_every if self.params_every is not None else (1 if cuda else PARAMS_EVERY)
        )
        if self.spec.enabled and self.spec.check_params and not self.deferred and every > 1:
            self.weights = WeightWindow(trainer, pl_module, self.tolerate_grads, every)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # what the replay needs to redo this step: batch, RNG, and progressive's precision
        self.begin_step(
            (batch, torch.get_rng_state(), getattr(trainer.precision_plugin, "active", None))
        )
        if self.deferred:
            self.deferred.keep(trainer.global_step, self._snapshot)
        elif self.weights and self.judge.failure is None:
            self.weights.keep(trainer.global_step, self._snapshot)
        if self.spec.enabled:
            self.attention.start(trainer.global_step)

    # forward: the loss
    def on_before_backward(self, trainer, pl_module, loss):
        if not self.spec.enabled or self.failure is not None or self._pending:
            return
        finite = torch.isfinite(loss.detach()).all()
        if self.deferred:
            self.deferred.note_loss(finite)
            return
        finite = bool(finite)
        if not finite and self._weights_bad(pl_module):
            return
        if self.loss_fails(trainer.global_step, finite, self._snapshot[0]):
            self.attention.close(trainer, deferred=self.weights is not None)
            self.fail(trainer, pl_module, "forward")

    # backward: gradients (already unscaled by the fp16 loss scaler), before clipping
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not self.spec.enabled:
            return
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if self.failure is not None or self._pending:
            for p in params:
                p.grad = None  # keep the weights of the failing step for replay
            return
        # no gradient at all (everything frozen, or dropped before this hook): norm 0
        total = judging.grad_norm(p.grad for p in params)
        if total is not None and all(
            p.grad.dtype == torch.float32 and p.grad.device == total.device for p in params
        ):
            pl_module.grad_norm_seen = ([p.grad for p in params], total)  # clipping reuses it
        active = getattr(trainer.precision_plugin, "active", None)
        if self.deferred:
            self.deferred.note_grads(total, optimizer, active)
            if (
                trainer.loggers
            ):  # Lightning's log() costs ~1 ms a call: only where it goes somewhere
                pl_module.log("train/grad_norm", total if total is not None else 0.0, batch_size=1)
            return
        if self.weights:
            self.weights.note_grads(optimizer, active)
        total = total.item() if total is not None else 0.0
        if trainer.loggers:
            pl_module.log("train/grad_norm", total, batch_size=1)
        if not math.isfinite(total) and self._weights_bad(pl_module):
            for p in params:
                p.grad = None
            return
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
        self.attention.close(
            trainer, deferred=self.deferred is not None or self.weights is not None
        )
        if self._pending:
            self._weights_caught(trainer, pl_module)
        if not self.spec.enabled or self._rewound:
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
            self._count_attention(None)
            trainer.should_stop = True
            return
        if self.weights:
            self.weights.end_step(self.judge.mark(), getattr(self.guard, "fired", None))
            if self.weights.due(step):
                if self._weights_caught(trainer, pl_module):
                    return
                self._count_attention(None)
                self.weights.restart()  # the last good state
        elif self.spec.check_params and self.params_fail(trainer, pl_module, step):
            return
        if math.isfinite(loss):
            self.watch_divergence(trainer, step, loss)
            if self.failure is not None and self._weights_caught(trainer, pl_module):
                return

    def on_train_end(self, trainer, pl_module):
        if self.deferred:
            self.deferred.read(trainer, pl_module)
        if self.weights and self.failure is None:
            self._weights_caught(trainer, pl_module)
        if self.weights:
            self._count_attention(None)
        if self.steps_done is None:
            self.judge.steps_done = trainer.global_step

    # the weights every N steps (sync mode)
    def _weights_bad(self, pl_module) -> bool:
        """Mid-step, before another failure is called: are the weights (as the last
        update left them) non-finite? Then the step's end locates the first bad update
        (re-running steps inside a live autograd graph would break it)."""
        window = self.weights
        if window is None or not window.unchecked:
            return False
        self._pending = not bool(judging.params_finite(pl_module.parameters()))
        return self._pending

    def _weights_caught(self, trainer, pl_module) -> bool:
        """The weights as they are now, checked; non-finite: find the step whose update
        made them so (re-running the kept steps from the last good snapshot), rewind the
        judge to it and fail there, as an every-step check would have. True when it did."""
        window = self.weights
        if window is None or not window.unchecked:
            return False
        if not self._pending and bool(judging.params_finite(pl_module.parameters())):
            return False
        self._pending = False
        kept = window.first_bad()  # the model is left as that step's update left it
        judge = self.judge
        judge.failure = None
        judge.stop = False
        if kept is None:  # the re-run made finite weights: as deferred mode says it
            last = window.done[-1]
            judge.rewind(last.mark)
            judge.params_fail_unconfirmed(last.step)
            stop = last.step
        else:
            judge.rewind(kept.mark)
            judge.begin_step(kept.snapshot)
            if not self.params_fail(trainer, pl_module, kept.step):
                judge.params_fail_unconfirmed(kept.step)
            stop = kept.step
            if self.guard is not None and kept.guard_fired is not None:
                self.guard.fired = kept.guard_fired
        self._count_attention(stop)
        judge.steps_done = stop + 1
        judge.failing_batch = None
        self._rewound = True
        self.weights = None
        trainer.should_stop = True
        return True

    def _count_attention(self, stop: int | None) -> None:
        if self.attention is not None:
            self.attention.count_up_to(stop)

    # the decisions, the judge's (also called by DeferredChecks.read in deferred mode)
    def begin_step(self, snapshot: tuple | None) -> None:
        self.judge.begin_step(snapshot)

    def loss_fails(self, step: int, finite: bool, batch: dict) -> bool:
        return self.judge.loss_fails(step, finite, batch)

    def grads_verdict(self, trainer, step: int, total: float):
        scaler = getattr(trainer.precision_plugin, "scaler", None) is not None
        return self.judge.grads_verdict(step, total, scaler, trainer.max_steps)

    def record_step(self, step: int, loss: float, lr: float) -> None:
        self.judge.record_step(step, loss, lr)

    def params_fail(self, trainer, pl_module, step: int) -> bool:
        failed = self.judge.params_fail(step, list(pl_module.named_parameters()))
        self._stop(trainer)
        return failed

    def params_fail_unconfirmed(self, trainer, step: int) -> None:
        self.judge.params_fail_unconfirmed(step)
        self._stop(trainer)

    def watch_divergence(self, trainer, step: int, loss: float) -> None:
        self.judge.watch_divergence(step, loss)
        self._stop(trainer)

    def note_grad_frac(self, params) -> None:
        self.judge.note_grad_frac(p.grad for p in params)

    def note_param_frac(self, pl_module) -> None:
        self.judge.note_param_frac(pl_module.parameters())

    def fail(self, trainer, pl_module, phase, step: int | None = None, snapshot=None):
        """A non-finite failure at `step` (default: this one): stop, and locate it by
        replaying the step of `snapshot` (default: this one) on the weights as they are."""
        step = trainer.global_step if step is None else step

        def locate(phase, snapshot):
            stats = self.attention.stats
            located = replay_step(pl_module, trainer.precision_plugin, phase, snapshot, stats)
            self.attention.count_logits(stats.summary())  # the failing step's logits count
            return located

        self.judge.fail(phase, step, snapshot, locate if self.spec.locate else None)
        self._stop(trainer)

    def fill_record(self, record) -> None:
        """The record's outcome fields (runner._fill_outcome)."""
        self.judge.fill_record(
            record,
            self.max_attn_logit,
            self.attn_dtype,
            getattr(self.guard, "fired", 0),
            time.time() - self.started,
        )


def _snapshot_fits(pl_module) -> bool:
    """auto on CUDA: deferred checks keep a snapshot of ~3x the trainable weights (weights
    and AdamW's two moments, deferred.py), and AdamW has not allocated its own 2x yet
    when training starts: defer only where the device has room for both with a margin, else
    read every step as on CPU (a full fine-tune filling the GPU must not go out of memory
    for the sake of a faster check)."""
    trainable = sum(p.numel() * p.element_size() for p in pl_module.parameters() if p.requires_grad)
    free, _ = torch.cuda.mem_get_info(pl_module.device)
    fits = free >= 6 * trainable
    if not fits:
        print(
            f"monitor: reading its checks every step (sync_every=1): deferred checks need "
            f"~{3 * trainable / 2**30:.1f} GiB for their snapshot, {free / 2**30:.1f} GiB "
            "is free; monitor.sync_every=N forces them"
        )
    return fits
