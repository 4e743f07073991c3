"""Locating the first non-finite value: which module, in which dtype, and why.

Nothing here runs on a healthy step. When the monitor sees a non-finite loss or gradient it
replays the failing step (same batch, same weights, same RNG state, same precision) with a
hook on every module, and names the first module in execution order whose output (forward)
or whose input's gradient (backward) was non-finite. The probe and the serving pass use
`first_nonfinite_forward` on their own forwards.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from nanlab.diagnosis import causes
from nanlab.numerics import attention


def first_bad(x) -> torch.Tensor | None:
    """The first floating-point tensor in `x` (any nesting) holding a non-finite value."""
    for t in causes.tensors(x):
        if t.is_floating_point() and not torch.isfinite(t).all():
            return t
    return None


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def first_nonfinite_forward(
    model, run_forward, why: list | None = None, sample_ids=None
) -> tuple[str | None, str | None, object]:
    """Run `run_forward()` with a forward hook on every module; return the first module (in
    completion order, so the innermost) whose output is non-finite, its dtype, and the
    forward's result. `why`, when given, receives the cause (causes.py) of that value."""
    found: list[tuple[str, str]] = []

    def hook(name):
        def fn(mod, args, output):
            if not found:
                bad = first_bad(output)
                if bad is not None:
                    found.append((name, _dtype_name(bad)))
                    if why is not None:
                        why.append(causes.module_cause(args, output, bad.dtype))

        return fn

    names = {id(m): n for n, m in model.named_modules()}

    def observe(module, query, key, mask, scaling, weights, out):
        # inside an attention layer the softmax is no module: catch it as it happens, before
        # the output projection (a child module) completes with the damage
        if not found and id(module) in names:
            bad = first_bad((weights, out))
            if bad is not None:
                found.append((names[id(module)], _dtype_name(bad)))
                if why is not None:
                    why.append(
                        causes.attention_cause(
                            query,
                            key,
                            mask,
                            scaling,
                            weights,
                            out,
                            getattr(module, "num_key_value_groups", 1),
                            sample_ids,
                        )
                    )

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


def hooked_backward(model, run_forward, backward) -> tuple[str | None, str | None]:
    """Forward with hooks that remember each module's inputs and outputs, then backward with
    tensor hooks on them; returns the first module whose gradient went non-finite."""
    events: list[tuple[str, str, str]] = []  # (name, which, dtype) in backward order

    def grad_hook(name, which):
        def fn(grad):
            if not torch.isfinite(grad).all():
                events.append((name, which, _dtype_name(grad)))

        return fn

    def fwd(name):
        def fn(mod, args, output):
            for which, xs in (("output", output), ("input", args)):
                for t in causes.tensors(xs):
                    if t.is_floating_point() and t.requires_grad:
                        t.register_hook(grad_hook(name, which))

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
            return name.rsplit(".", 1)[0], _dtype_name(p.grad)
    return None, None


@dataclass
class Located:
    module: str | None  # the first module with a non-finite output or input gradient
    dtype: str | None  # the dtype of that value
    agrees: bool  # the replay failed too (the failure is reproducible)
    cause: tuple | None  # causes.py's (cause, detail, value) for that value, if one fits


def replay_step(pl_module, plugin, phase: str, snapshot: tuple, stats) -> Located:
    """Replay one training step with hooks: `snapshot` is (batch, CPU RNG state, progressive
    precision flag) as the monitor kept it; the weights are the model's as they are now.
    forward: no-grad forward with forward hooks; backward: forward and backward with
    gradient hooks (the fp16 loss scaler's current scale, as training used). `stats`
    (AttentionStats) observes the replay: the failing step's logits count too. Every
    parameter's .grad, the RNG state and the precision flag are put back afterwards."""
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

        with stats.active():
            if phase == "forward":
                loss: Any
                with torch.no_grad():
                    name, dtype, loss = first_nonfinite_forward(
                        model, forward, why, batch.get("sample_ids")
                    )
                agrees = not torch.isfinite(loss).all().item()
            else:
                for p in saved:
                    p.grad = None
                scaler = getattr(plugin, "scaler", None)

                def backward(loss):
                    with backward_context(plugin):
                        (scaler.scale(loss) if scaler is not None else loss).backward()

                name, dtype = hooked_backward(model, forward, backward)
                agrees = name is not None
        return Located(name, dtype, agrees, next((w for w in why if w), None))
    finally:
        torch.set_rng_state(rng)
        if active is not None:
            plugin.active = was_active
        for p, g in saved.items():
            p.grad = g


def backward_context(plugin):
    """The context the precision plugin runs backward in (fp32-accumulated half GEMMs on
    CPUs without native ones: nanlab/numerics/precision.py); none for Lightning's own plugins."""
    if hasattr(plugin, "backward_context"):
        return plugin.backward_context()
    return contextlib.nullcontext()
