"""`NanMonitorCallback`: the project's NaN monitor for `transformers.Trainer` (and the
frameworks on top of it: LLaMA-Factory, ms-swift, TRL), added with one line:

    trainer = Trainer(..., callbacks=[NanMonitorCallback(out_dir="nan")])

Why: Trainer's `logging_nan_inf_filter` (default on) leaves a non-finite loss out of the
logged mean, while backward and the optimizer step still run: a user sees "loss 0.0,
grad_norm nan" lines, and by then clip_grad_norm_ (one NaN element makes every clipped
gradient NaN) and AdamW have turned every weight into NaN.

What it does, each step, with the project's judge (nanlab/diagnosis/judge.py: the same
decisions, causes and record as `src.train`'s Lightning monitor):
- the loss of the step (Trainer.training_step's return; read from the trainer it finds in
  `on_train_begin`), finite or not: a NaN over zero supervised tokens (every label -100)
  is counted as `empty_targets` and the run goes on (its gradients are zero);
- the total gradient norm before clipping (Trainer's own, from `_get_grad_norm`: no
  extra pass), non-finite or not;
- the weights after the update (one fused pass), then divergence and spikes;
- on the first non-finite value: replays the step with a hook on every module (which
  module first, in which dtype: nanlab/diagnosis/locate.py), names the cause
  (nanlab/diagnosis/causes.py), writes `out_dir/record.json` (nanlab.record.Record,
  `trainer: transformers`) and prints the one-paragraph verdict, ending with what the
  committed map measured for that cause (nanlab/integrations/fixes.py);
- `on_failure="stop"` (default): `control.should_training_stop`, the run ends cleanly;
  `"skip_step"`: the step's update is dropped (every .grad set to None, as guard=skip_step),
  the run goes on, and `max_skipped_in_row` skipped steps in a row are a failure;
- it says when `logging_nan_inf_filter` was hiding a non-finite loss from the logs;
- with W&B active (`report_to` has "wandb" and a run is open): the record goes to the run
  summary and `wandb.alert` is raised once (neither transformers' WandbCallback nor
  Lightning's WandbLogger calls it).

Where it cannot be the Lightning monitor's record: Trainer clips before any callback sees
the gradients, so with `max_grad_norm > 0` the non-finite gradient fraction is measured on
clipped gradients (all NaN after one NaN element) where src.train measures it before
clipping; the gradient norm in the history is Trainer's pre-clip norm, as src.train's.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from nanlab.config.specs import MonitorSpec
from nanlab.diagnosis import judge as judging
from nanlab.diagnosis.attention_stats import SampledAttention
from nanlab.diagnosis.judge import StepJudge
from nanlab.diagnosis.locate import replay_step
from nanlab.record import Record, write_record

ON_FAILURE = ("stop", "skip_step")
# the weights are checked after every this many updates (one pass over every parameter:
# ~4 ms of a ~100 ms tiny-model step on CPU), at the end, and before any other failure is
# called. Unlike the Lightning monitor (whose window re-runs steps to find the exact
# update), a check that finds a non-finite weight here dates it to the window of updates
# since the last good check and says so; params_every=1 dates it exactly.
PARAMS_EVERY = 32


class _Plugin:
    """What locate.replay_step needs of a precision plugin, for a plain Trainer: the
    Trainer's own autocast (bf16/fp16 arguments) around the replayed forward."""

    def __init__(self, args, device):
        self.dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
        self.device = device

    def convert_input(self, batch):
        return batch

    def train_step_context(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


class _Module:
    """What locate.replay_step needs of a LightningModule: the model, its loss, its
    parameters."""

    def __init__(self, model, compute_loss):
        self.model = model
        self.compute_loss = compute_loss

    def parameters(self):
        return self.model.parameters()


class NanMonitorCallback(TrainerCallback):
    """The NaN monitor as a transformers TrainerCallback (see the module's docstring).

    out_dir: where record.json (and history.csv) go; None: the Trainer's output_dir.
    on_failure: "stop" (default) or "skip_step" (drop the update of a step with a
        non-finite gradient and go on; a streak of `max_skipped_in_row` is a failure).
    every: attention statistics every N steps (0: never); locate: replay a failure with
        module hooks; check_params: the weights finite after each update.
    record: a nanlab.record.Record to fill (its config fields set by the caller, as
        experiments/hf_trainer.py does); None: one made from the TrainingArguments.
    plugin, compute_loss: what a replay of the step runs (default: Trainer's autocast and
        `trainer.compute_loss`); experiments/hf_trainer.py passes the project's.
    verbose: print the verdict at the end."""

    def __init__(
        self,
        out_dir=None,
        on_failure: str = "stop",
        every: int = 10,
        locate: bool = True,
        check_params: bool = True,
        max_skipped_in_row: int = 10,
        record: Record | None = None,
        plugin=None,
        compute_loss=None,
        verbose: bool = True,
        spec: MonitorSpec | None = None,
        params_every: int = PARAMS_EVERY,
    ):
        if on_failure not in ON_FAILURE:
            raise ValueError(f"on_failure={on_failure!r}: one of {', '.join(ON_FAILURE)}")
        self.spec = spec or MonitorSpec(
            every=every,
            locate=locate,
            check_params=check_params,
            max_skipped_in_row=max_skipped_in_row,
            sync_every=1,
        )
        self.out_dir = out_dir
        self.on_failure = on_failure
        self.judge = StepJudge(self.spec, tolerate_nonfinite_grads=on_failure == "skip_step")
        self.record = record
        self.plugin, self._compute_loss = plugin, compute_loss
        self.verbose = verbose
        self.params_every = max(int(params_every), 1)
        self._checked = -1  # the last step after which the weights were seen finite
        self.trainer: Any = None  # found in on_train_begin
        self.args: Any = None
        self.final: Record | None = None
        self.fired = 0  # steps whose update skip_step dropped
        self.hidden_steps: list[int] = []  # non-finite losses logging_nan_inf_filter hid
        self.alerted = False
        self.attention: Any = None  # SampledAttention, from on_train_begin
        self._loss = None  # this step's loss (device), from training_step
        self._total = None  # this step's pre-clip gradient norm, from _get_grad_norm
        self._poisoned = False
        self._dropped = False  # the step's update is dropped (failure, or skip_step)
        self.started = time.time()

    # --- finding the trainer: its loss and gradient norm, not passed to callbacks ------------
    def _find_trainer(self):
        from transformers import Trainer

        frame = inspect.currentframe()
        while frame is not None:
            obj = frame.f_locals.get("self")
            if isinstance(obj, Trainer):
                return obj
            frame = frame.f_back
        return None

    def _wrap(self, trainer) -> None:
        training_step, get_grad_norm = trainer.training_step, trainer._get_grad_norm

        def step(model, inputs, *args, **kwargs):
            self.judge.begin_step((inputs, torch.get_rng_state(), None))
            loss = training_step(model, inputs, *args, **kwargs)
            self._loss = loss
            self._after_loss(inputs, loss)
            return loss

        def norm(model, grad_norm=None):
            total = get_grad_norm(model, grad_norm=grad_norm)
            self._total = total
            return total

        trainer.training_step, trainer._get_grad_norm = step, norm

    # --- the hooks ------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.args, self.model, self.optimizer = args, model, optimizer
        self.trainer = self._find_trainer()
        if self.trainer is None:
            raise RuntimeError("NanMonitorCallback: no transformers.Trainer calls this callback")
        self._wrap(self.trainer)
        self.optimizer = self.trainer.optimizer
        device = next(model.parameters()).device
        self.plugin = self.plugin or _Plugin(args, device)
        self.max_steps = state.max_steps
        self.attention = SampledAttention(model, self.spec.every)
        self.started = time.time()
        if self.out_dir is None:
            self.out_dir = args.output_dir

    def on_step_begin(self, args, state, control, **kwargs):
        self._loss = self._total = None
        self._dropped = self.judge.failure is not None
        self.attention.start(state.global_step)

    def _after_loss(self, batch, loss) -> None:
        """Forward done (and backward, in Trainer's training_step): the loss."""
        if self.judge.failure is not None:
            return
        step = self.trainer.state.global_step
        finite = bool(torch.isfinite(loss.detach()).all())
        if not finite and self.args.logging_nan_inf_filter:
            self.hidden_steps.append(step)
        if not finite and self._weights_bad(step):
            return
        if self.judge.loss_fails(step, finite, batch):
            self.attention.close(_NoLogger, deferred=False)
            self._fail("forward", step)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        """After Trainer's clipping, before optimizer.step()."""
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if self.judge.failure is not None or self._dropped:
            self._drop(params)
            return
        total = self._total
        if total is None:  # Trainer gave none (another loop): the norm of what is there
            total = judging.grad_norm(p.grad for p in params)
        total = float(total) if total is not None else 0.0
        step = state.global_step
        if not math.isfinite(total) and self._weights_bad(step):
            self._drop(params)
            return
        verdict = self.judge.grads_verdict(step, total, scaler=False, max_steps=self.max_steps)
        if not math.isfinite(total) and self.on_failure == "skip_step":
            self.fired += 1
            self._drop(params)  # guard=skip_step: this step's update is dropped
        if verdict == "backward":
            self._fail("backward", step)
            self.judge.note_grad_frac(p.grad for p in params)
            self._poisoned = True  # let the optimizer step run once: measure the spread
        elif verdict is not None:
            first, phase, snapshot = verdict
            self._fail(phase, first, snapshot)

    def _drop(self, params) -> None:
        for p in params:
            p.grad = None
        self._dropped = True

    def on_step_end(self, args, state, control, **kwargs):
        self.attention.close(_NoLogger, deferred=False)
        step = state.global_step - 1
        judge = self.judge
        if judge.steps_done is not None:  # failed at an earlier step: training is stopping
            control.should_training_stop = True
            return
        loss = float(self._loss) if self._loss is not None else math.nan
        loss *= getattr(self.trainer, "current_gradient_accumulation_steps", 1) or 1
        judge.record_step(step, loss, self.optimizer.param_groups[0]["lr"])
        if self._poisoned:
            self._poisoned = False
            judge.note_param_frac(self.model.parameters())
        if (
            judge.failure is None
            and self.spec.check_params
            and ((step + 1) % self.params_every == 0 or step + 1 >= self.max_steps)
        ):
            self._check_weights(step, step)
        if judge.failure is None and math.isfinite(loss):
            judge.watch_divergence(step, loss)
            if judge.failure is not None:
                self._weights_bad(step + 1, dropped=judge.failure)
        if judge.failure is not None:
            judge.steps_done = step + 1
            control.should_training_stop = True
            self.finish()

    def on_train_end(self, args, state, control, **kwargs):
        last = state.global_step - 1
        if (
            self.judge.failure is None
            and self.spec.check_params
            and last > self._checked
            and self._check_weights(last, last)
        ):
            self.judge.steps_done = state.global_step
        if self.judge.steps_done is None:
            self.judge.steps_done = state.global_step
        if not self._finished:
            self.finish()

    _finished = False

    # --- the weights, every params_every updates --------------------------------------------------
    def _check_weights(self, step: int, last: int) -> bool:
        """The weights now (after update `last`): a failure of the optimizer step if one is
        non-finite, dated to `step` when every update was checked, else to the first update
        since the last good check, with the window in its detail."""
        first = self._checked + 1
        if not self.judge.params_fail(
            min(last, first), list(self.model.named_parameters()), prefix=""
        ):
            self._checked = last
            return False
        if first < last:
            f = self.judge.failure
            assert f is not None  # _weights_bad is asked on a failure
            f.cause_detail = (f.cause_detail or "") + (
                f" (weights checked every {self.params_every} updates: the update"
                f" that made them non-finite ran in steps {first}..{last}; "
                "params_every=1 dates it exactly)"
            )
            f.replay_agrees = None
        return True

    def _weights_bad(self, step: int, dropped=None) -> bool:
        """Before calling another failure at `step`: were the weights already non-finite
        (after update step - 1)? Then that is the failure (the optimizer's)."""
        if not self.spec.check_params or self._checked >= step - 1 or step == 0:
            return False
        judge = self.judge
        judge.failure, judge.stop = None, False
        if self._check_weights(step - 1, step - 1):
            judge.history.truncate(step)  # steps from `step` on ran on non-finite weights
            judge.steps_done = step
            return True
        judge.failure = dropped
        judge.stop = dropped is not None
        return False

    # --- locating and the record ---------------------------------------------------------------
    def _fail(self, phase: str, step: int, snapshot=None) -> None:
        def compute_loss(batch):
            if self._compute_loss is not None:
                return self._compute_loss(batch)
            return self.trainer.compute_loss(self.model, batch)

        def locate(phase, snapshot):
            stats = self.attention.stats
            batch = self.trainer._prepare_inputs(snapshot[0])
            located = replay_step(
                _Module(self.model, compute_loss), self.plugin, phase, (batch, *snapshot[1:]), stats
            )
            self.attention.count_logits(stats.summary())
            return located

        self.judge.fail(phase, step, snapshot, locate if self.spec.locate else None)

    def make_record(self) -> Record:
        rec = self.record or _record_from_args(self.args, self.model)
        rec.trainer = "transformers"
        rec.max_steps = rec.max_steps or self.max_steps
        self.judge.fill_record(
            rec,
            self.attention.max_logit if self.attention else None,
            self.attention.dtype if self.attention else None,
            self.fired,
            time.time() - self.started,
        )
        rec.wall_time_s = round(time.time() - self.started, 2)
        return rec

    def finish(self) -> Record:
        """Write record.json and history.csv, print the verdict, tell W&B; once."""
        self._finished = True
        rec = self.make_record()
        out = Path(self.out_dir)
        rec.run_dir = rec.run_dir or str(out)
        write_record(rec, out)
        (out / "history.csv").write_text(self.judge.history_csv())
        self.verdict = verdict(rec, self.hidden_steps)
        if self.verbose:
            print(
                self.verdict,
                file=sys.stderr if rec.status in ("nonfinite", "diverged") else sys.stdout,
            )
        self._tell_wandb(rec)
        self.final = rec
        return rec

    def _tell_wandb(self, rec: Record) -> None:
        report_to: Any = self.args.report_to if self.args is not None else []
        if "wandb" not in (report_to or []) and report_to != "all":
            return
        try:
            import wandb
        except ImportError:
            return
        if wandb.run is None:
            return
        wandb.run.summary.update(rec.summary())
        if rec.status in ("nonfinite", "diverged") and not self.alerted:
            self.alerted = True
            # alert and AlertLevel are absent from wandb's type stubs
            error = wandb.AlertLevel.ERROR  # type: ignore[attr-defined]
            wandb.alert(  # type: ignore[attr-defined]
                title=f"nanlab: {rec.status} at step {rec.first_bad_step}",
                text=self.verdict[:1000],
                level=error,
            )


class _NoLogger:  # SampledAttention.close logs to trainer.loggers: the Trainer logs itself
    loggers = ()
    global_step = 0


def verdict(rec: Record, hidden_steps=()) -> str:
    """The record's verdict (src.train's paragraph), plus what logging_nan_inf_filter hid."""
    text = rec.verdict()
    if hidden_steps:
        steps = ", ".join(map(str, hidden_steps[:8]))
        text += (
            f" Trainer's logging_nan_inf_filter (on) left the non-finite loss of step(s) "
            f"{steps} out of the logged loss: the log showed a finite loss while backward "
            "and the optimizer step ran on it."
        )
    return text


def _record_from_args(args, model) -> Record:
    import transformers

    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", "") or type(model).__name__
    # the attention implementation the model runs (sdpa, eager, ...), as src.train's softmax
    softmax = str(getattr(config, "_attn_implementation", "") or "")
    return Record(
        precision=precision,
        softmax=softmax,
        lr=float(args.learning_rate),
        warmup_steps=int(args.warmup_steps or 0),
        clip=float(args.max_grad_norm or 0),
        seed=int(args.seed),
        model=str(name),
        torch_version=torch.__version__,
        transformers_version=transformers.__version__,
        guard="none",
        max_steps=int(args.max_steps or 0),
    )
