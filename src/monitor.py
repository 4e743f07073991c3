"""One set of hooks: cheap per-step checks, attention statistics, and locating the first
non-finite value.

The common case pays a handful of reductions per step (loss, gradient norm, parameter
norms). Only when something goes non-finite does `locate` replay the failing step (same
batch, same weights, same RNG) with hooks on every module, to name the first module in
execution order whose output (forward) or input gradient (backward) was non-finite.
The probe reuses `AttentionStats` and `first_nonfinite_forward`.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch
from lightning.pytorch.callbacks import Callback

from . import attention, causes


@dataclass
class MonitorSpec:
    enabled: bool = True
    every: int = 10              # attention statistics every N steps (0: never)
    check_params: bool = True    # parameters finite after every optimizer step
    locate: bool = True          # replay the failing step to find the first bad module
    diverge_factor: float = 4.0  # diverged: loss > factor x running min ...
    patience: int = 5            # ... for this many steps in a row
    spike_factor: float = 2.0    # a spike: loss > factor x its moving average
    max_skipped_in_row: int = 10  # fp16 loss scaler or guard=skip_step: this many skipped
    #                               steps in a row is a failure
    train_margin: float = 0.1    # ok needs final loss < initial loss x (1 - margin), else stalled


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


def _first_bad(x) -> torch.Tensor | None:
    for t in causes.tensors(x):
        if t.is_floating_point() and not torch.isfinite(t).all():
            return t
    return None


# --- attention statistics ---------------------------------------------------------------

class AttentionStats:
    """Per attention layer: largest logit, mean entropy, non-finite weights. Observes the
    attention functions through `attention.OBSERVERS` while active."""

    def __init__(self, model):
        self.names = {id(m): n for n, m in model.named_modules()}
        self.stats: dict[str, dict] = {}

    def __call__(self, module, query, key, mask, scaling, weights, out):
        name = self.names.get(id(module))
        if name is None:
            return  # another model's attention
        with torch.no_grad():
            k = attention.repeat_kv(key, getattr(module, "num_key_value_groups", 1))
            logits = torch.matmul(query.float(), k.float().transpose(2, 3)) * scaling
            masked = attention._masked(mask)
            if masked is not None:
                logits = logits.masked_fill(masked, float("-inf"))
            finite = torch.isfinite(logits)
            top = logits[finite].max().item() if finite.any() else float("nan")
            p = weights.float() if weights is not None else torch.softmax(logits, dim=-1)
            ent = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
            ent = ent[torch.isfinite(ent)].mean().item() if torch.isfinite(ent).any() else math.nan
            watched = weights if weights is not None else out
            bad = (~torch.isfinite(watched)).sum().item()
        # the dtype the attention probabilities (or, for sdpa, outputs) were computed in
        s = self.stats.setdefault(name, {"max_logit": -math.inf, "entropy": [], "nonfinite": 0,
                                         "dtype": str(watched.dtype).replace("torch.", "")})
        s["max_logit"] = max(s["max_logit"], top) if not math.isnan(top) else s["max_logit"]
        s["entropy"].append(ent)
        s["nonfinite"] += bad

    @contextlib.contextmanager
    def active(self):
        self.stats = {}
        attention.OBSERVERS.append(self)
        try:
            yield self
        finally:
            attention.OBSERVERS.remove(self)

    def summary(self) -> dict[str, dict]:
        return {n: {"max_logit": s["max_logit"], "nonfinite": s["nonfinite"], "dtype": s["dtype"],
                    "entropy": float(sum(s["entropy"]) / max(len(s["entropy"]), 1))}
                for n, s in self.stats.items()}


# --- locating the first non-finite module --------------------------------------------------

def first_nonfinite_forward(model, run_forward, why: list | None = None,
                            sample_ids=None) -> tuple[str | None, str | None, object]:
    """Run `run_forward()` with a forward hook on every module; return the first module (in
    completion order, so the innermost) whose output is non-finite, its dtype, and the
    forward's result. `why`, when given, receives the cause (causes.py) of that value."""
    found: list[tuple[str, str]] = []

    def hook(name):
        def fn(mod, args, output):
            if not found:
                bad = _first_bad(output)
                if bad is not None:
                    found.append((name, str(bad.dtype).replace("torch.", "")))
                    if why is not None:
                        why.append(causes.module_cause(args, output, bad.dtype))
        return fn

    names = {id(m): n for n, m in model.named_modules()}

    def observe(module, query, key, mask, scaling, weights, out):
        # inside an attention layer the softmax is no module: catch it as it happens, before
        # the output projection (a child module) completes with the damage
        if not found and id(module) in names:
            bad = _first_bad((weights, out))
            if bad is not None:
                found.append((names[id(module)], str(bad.dtype).replace("torch.", "")))
                if why is not None:
                    why.append(causes.attention_cause(
                        query, key, mask, scaling, weights, out,
                        getattr(module, "num_key_value_groups", 1), sample_ids))

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    attention.OBSERVERS.append(observe)
    try:
        result = run_forward()
    finally:
        attention.OBSERVERS.remove(observe)
        for h in handles:
            h.remove()
    name, dtype = found[0] if found else (None, None)
    return name, dtype, result


def _hooked_backward(model, run_forward, backward):
    """Forward with hooks that remember each module's inputs and outputs, then backward with
    tensor hooks on them; returns the first module whose gradient went non-finite."""
    events: list[tuple[str, str, str]] = []   # (name, which, dtype) in backward order

    def fwd(name):
        def fn(mod, args, output):
            for which, xs in (("output", output), ("input", args)):
                for t in causes.tensors(xs):
                    if t.is_floating_point() and t.requires_grad:
                        t.register_hook(_grad_hook(name, which))
        return fn

    def _grad_hook(name, which):
        def fn(grad):
            if not torch.isfinite(grad).all():
                events.append((name, which, str(grad.dtype).replace("torch.", "")))
        return fn

    handles = [m.register_forward_hook(fwd(n)) for n, m in model.named_modules() if n]
    try:
        loss = run_forward()
    finally:
        for h in handles:
            h.remove()
    backward(loss)
    for name, which, dtype in events:
        # gradient w.r.t. a module's input made non-finite by that module's backward
        if which == "input":
            return name, dtype
    if events:
        return events[0][0], events[0][2]
    for name, p in model.named_parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            return name.rsplit(".", 1)[0], str(p.grad.dtype).replace("torch.", "")
    return None, None


# --- the callback ---------------------------------------------------------------------------

class NanMonitor(Callback):
    """Checks every step; on the first non-finite value, locates it, names its cause and
    stops cleanly. Two exceptions, both measured rather than assumed:
    - a NaN loss over zero supervised tokens (its gradients are zero, the weights unharmed)
      is recorded (cause empty_targets) and counted, and the run goes on;
    - a non-finite gradient lets that one optimizer step run (clipping, AdamW), so the record
      says how far the poison spread (nonfinite_param_frac), then stops."""

    def __init__(self, spec: MonitorSpec, tolerate_nonfinite_grads: bool = False):
        self.spec = spec
        self.tolerate_grads = tolerate_nonfinite_grads  # guard=skip_step handles them
        self.failure: Failure | None = None
        self.empty: Failure | None = None    # the first step whose batch had no target
        self.empty_steps = 0
        self.history = History()
        self.max_grad_norm = 0.0
        self.max_attn_logit: float | None = None
        self.attn_dtype: str | None = None
        self.spikes = 0
        self.scaler_skips = 0
        self._skips_in_row = 0
        self._phase = None
        self._ema: float | None = None
        self._min_loss = math.inf
        self._above = 0
        self._stats_ctx = None
        self._poisoned = False
        self.failing_batch = None
        self.started = time.time()

    # step bookkeeping
    def on_train_start(self, trainer, pl_module):
        self.stats = AttentionStats(pl_module.model)
        self.started = time.time()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # what the replay needs to redo this step: batch, RNG, and progressive's precision
        self._snapshot = (batch, torch.get_rng_state(),
                          getattr(trainer.precision_plugin, "active", None))
        self._batch = batch
        self._phase = None
        self._grad_norm = math.nan
        every = self.spec.every
        if self.spec.enabled and every and trainer.global_step % every == 0:
            self._stats_ctx = self.stats.active()
            self._stats_ctx.__enter__()

    def _close_stats(self, trainer):
        if self._stats_ctx is None:
            return
        self._stats_ctx.__exit__(None, None, None)
        self._stats_ctx = None
        summary = self.stats.summary()
        self._note_logits(summary)
        metrics = {}
        for name, s in summary.items():
            short = name.replace("model.", "").replace("language_model.layers", "llm")
            short = short.replace("visual.blocks", "vit")
            metrics[f"attn/{short}/max_logit"] = s["max_logit"]
            metrics[f"attn/{short}/entropy"] = s["entropy"]
            metrics[f"attn/{short}/nonfinite"] = float(s["nonfinite"])
            self.attn_dtype = s["dtype"]
        if trainer.loggers and metrics:
            for lg in trainer.loggers:
                lg.log_metrics(metrics, step=trainer.global_step)

    def _note_logits(self, summary: dict) -> None:
        logits = [s["max_logit"] for s in summary.values() if math.isfinite(s["max_logit"])]
        if logits:
            top = max(logits)
            self.max_attn_logit = top if self.max_attn_logit is None else max(
                self.max_attn_logit, top)

    # forward: the loss
    def on_before_backward(self, trainer, pl_module, loss):
        if not self.spec.enabled or self.failure is not None:
            return
        if torch.isfinite(loss.detach()).all():
            return
        empty = causes.empty_targets_cause(self._batch)
        if empty is not None:
            # 0/0 over zero targets: NaN loss, zero gradients, weights unharmed; go on
            self.empty_steps += 1
            if self.empty is None:
                self.empty = Failure("nonfinite", trainer.global_step, "forward")
                self.empty.explain(empty)
            return
        if self.tolerate_grads:
            # guard=skip_step: the gradients will be non-finite too and the guard skips
            # the step; a failure only if it keeps happening (see _skipped)
            self._phase = "forward"
            return
        self._close_stats(trainer)
        self._fail(trainer, pl_module, "forward")

    # backward: gradients (already unscaled by the fp16 loss scaler), before clipping
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not self.spec.enabled:
            return
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if self.failure is not None:
            for p in params:
                p.grad = None  # keep the weights of the failing step for replay
            return
        norms = torch._foreach_norm([p.grad for p in params])
        total = torch.linalg.vector_norm(torch.stack(norms).float()).item() if norms else 0.0
        self._grad_norm = total
        pl_module.log("train/grad_norm", total, batch_size=1)
        if math.isfinite(total):
            self.max_grad_norm = max(self.max_grad_norm, total)
            self._skips_in_row = 0
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None or self.tolerate_grads:
            # fp16: the loss scaler skips this step and lowers its scale; guard=skip_step
            # skips it: their job, not a failure, unless it keeps happening
            self.scaler_skips += scaler is not None
            self._skipped(trainer, pl_module, self._phase or "backward")
            return
        self._fail(trainer, pl_module, "backward")
        bad = sum(int((~torch.isfinite(p.grad)).sum()) for p in params)
        self.failure.grad_frac = bad / max(sum(p.grad.numel() for p in params), 1)
        self._poisoned = True  # let clipping and AdamW run once: measure the spread

    def _skipped(self, trainer, pl_module, phase):
        """A step the guard skipped: a run whose every step is skipped from some point on
        only looks alive, so `max_skipped_in_row` skips in a row (or skipping until the end)
        fail it at the first step of the streak."""
        if self._skips_in_row == 0:
            self._streak = (trainer.global_step, phase, self._snapshot)
        self._skips_in_row += 1
        # a streak still running at the last step counts too, but one skipped step at the
        # end is just one skipped step
        last = trainer.global_step + 1 >= (trainer.max_steps or 0) and self._skips_in_row > 1
        if self._skips_in_row >= self.spec.max_skipped_in_row or last:
            step, phase, snapshot = self._streak
            self._fail(trainer, pl_module, phase, step=step, snapshot=snapshot)

    # optimizer: parameters, loss history, divergence
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._close_stats(trainer)
        if not self.spec.enabled:
            return
        step = trainer.global_step - 1  # the step that just ran
        loss = float(outputs["loss"]) if outputs is not None else math.nan
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        for k, v in (("step", step), ("loss", loss), ("grad_norm", self._grad_norm), ("lr", lr)):
            getattr(self.history, k).append(v)
        if self._poisoned:
            self._poisoned = False
            self.failure.param_frac = _nonfinite_fraction(pl_module.parameters())
        if self.failure is not None:
            trainer.should_stop = True
            return
        if self.spec.check_params:
            params = [p for p in pl_module.parameters()]
            norms = torch.stack(torch._foreach_norm(params)).float()
            if not torch.isfinite(norms).all():
                i = int((~torch.isfinite(norms)).nonzero()[0])
                name = [n for n, _ in pl_module.named_parameters()][i]
                self.failure = Failure("nonfinite", step, "optimizer",
                                       name.removeprefix("model.").rsplit(".", 1)[0],
                                       str(params[i].dtype).replace("torch.", ""))
                self.failure.explain(("optimizer_poison", _POISON, None))
                self.failure.param_frac = _nonfinite_fraction(params)
                trainer.should_stop = True
                return
        if math.isfinite(loss):
            self._watch_divergence(trainer, step, loss)

    def _watch_divergence(self, trainer, step, loss):
        if self._ema is not None and loss > self.spec.spike_factor * self._ema:
            self.spikes += 1
        self._ema = loss if self._ema is None else 0.9 * self._ema + 0.1 * loss
        self._min_loss = min(self._min_loss, loss)
        if loss > self.spec.diverge_factor * self._min_loss:
            self._above += 1
            if self._above >= self.spec.patience:
                self.failure = Failure("diverged", step - self.spec.patience + 1)
                detail = (f"loss {loss:.3g} > {self.spec.diverge_factor:g} x its minimum "
                          f"{self._min_loss:.3g} for {self.spec.patience} steps")
                self.failure.explain(("divergence", detail, loss / self._min_loss))
                trainer.should_stop = True
        else:
            self._above = 0

    # locating
    def _fail(self, trainer, pl_module, phase, step: int | None = None, snapshot=None):
        step = trainer.global_step if step is None else step
        snapshot = snapshot or self._snapshot
        self.failure = Failure("nonfinite", step, phase)
        self.failing_batch = snapshot[0]
        trainer.should_stop = True
        found = causes.input_cause(snapshot[0])
        if self.spec.locate:
            name, dtype, agrees, why = self._locate(trainer, pl_module, phase, snapshot)
            self.failure.module, self.failure.dtype, self.failure.replay_agrees = (
                name, dtype, agrees)
            found = found or why
        if found is None and phase == "backward":
            found = ("grad_nonfinite", "finite forward and loss, non-finite gradient"
                     + (f" first at {self.failure.module}" if self.failure.module else ""), None)
        self.failure.explain(found)

    def _locate(self, trainer, pl_module, phase, snapshot):
        """Replay the failing step with hooks: same batch, same weights, same RNG state, and
        the precision it ran in (progressive: fp32 or bf16 as at that step)."""
        plugin = trainer.precision_plugin
        model = pl_module.model
        batch_in, rng_state, active = snapshot
        batch = plugin.convert_input(batch_in)
        saved = {p: p.grad for p in pl_module.parameters()}
        rng = torch.get_rng_state()
        was_active = getattr(plugin, "active", None)
        torch.set_rng_state(rng_state)
        if active is not None:
            plugin.active = active
        why: list = []
        try:
            def forward():
                with plugin.train_step_context():
                    return pl_module.compute_loss(batch)

            with self.stats.active():
                if phase == "forward":
                    with torch.no_grad():
                        name, dtype, loss = first_nonfinite_forward(
                            model, forward, why, batch.get("sample_ids"))
                    agrees = not torch.isfinite(loss).all().item()
                else:
                    for p in saved:
                        p.grad = None
                    scaler = getattr(plugin, "scaler", None)

                    def backward(loss):
                        with plugin.backward_context() if hasattr(plugin, "backward_context") \
                                else contextlib.nullcontext():
                            (scaler.scale(loss) if scaler is not None else loss).backward()

                    name, dtype = _hooked_backward(model, forward, backward)
                    agrees = name is not None
            self._note_logits(self.stats.summary())  # the failing step's logits count too
            return name, dtype, agrees, next((w for w in why if w), None)
        finally:
            torch.set_rng_state(rng)
            if active is not None:
                plugin.active = was_active
            for p, g in saved.items():
                p.grad = g


_POISON = "finite gradients, non-finite parameters after the optimizer step"


def _nonfinite_fraction(params) -> float:
    params = list(params)
    bad = sum(int((~torch.isfinite(p)).sum()) for p in params)
    return bad / max(sum(p.numel() for p in params), 1)
