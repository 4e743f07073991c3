"""Deferred checking (monitor.sync_every > 1, the default on CUDA) makes the record sync
checking (1, the default on CPU) makes: same status, first bad step, phase, module, cause,
fractions, maxima and history, although it reads the device only every few steps, training
goes on past the failure until it does, and locating needs the kept steps re-run from the
last snapshot.

On CPU, where sync_every can be forced; each case runs twice (sync, then deferred).
"""

from __future__ import annotations

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from helpers import FAST, ROOT
from nanlab.config.compose import compose_spec
from nanlab.diagnosis.deferred import DeferredChecks
from nanlab.diagnosis.monitor import NanMonitor
from nanlab.run.runner import run

MAP = ["experiment=nan_map_base", "logger=none", "serve.enabled=false"]


def baseline(name: str) -> list[str]:
    return yaml.safe_load((ROOT / "conf" / "stress" / f"{name}.yaml").read_text())["baseline"]


# name: (overrides, sync_every of the deferred run). The comments say where the deferred
# run's read finds the failure and what it re-runs from its snapshot.
CASES = {
    # naive softmax overflows at step 2; read after step 3: re-runs 0-1, locates 2
    "forward": (
        [*FAST, "model.init=random", "softmax=naive", "lr=0.3", "precision=fp32", "max_steps=12"],
        4,
    ),
    # a NaN gradient at step 3; read after step 4: re-runs 0-2, then 3's backward, locates
    # it and lets its poisoned update run, as sync mode did
    "backward": ([*MAP, "stress=grad_poison", *baseline("grad_poison")], 5),
    # the lr spike diverges from step 9, called at step 13; read after step 15
    "diverged": ([*MAP, "stress=lr_spike", *baseline("lr_spike")], 4),
    # finite gradients, an inf weight after step 2's update (PoisonUpdate); read after
    # step 3: re-runs 0-2 to measure the weights
    "optimizer": ([*FAST, "max_steps=6", "precision=fp32", "serve.enabled=false"], 4),
    # guard=skip_step skips steps 0-7 in a row: a failure at step 0, called at step 7;
    # snapshots at 3 and 6, read after step 8: re-runs 6, locates step 0's batch
    "skip_streak": (
        [
            *MAP,
            "stress=logit_growth",
            "softmax=naive",
            "precision=progressive",
            "precision.switch_step=4",
            "guard=skip_step",
            "monitor.max_skipped_in_row=8",
        ],
        3,
    ),
    # finite throughout: snapshot at 4, last read at the end
    "ok": ([*FAST, "max_steps=6", "serve.enabled=false"], 4),
}
FIELDS = (
    "status",
    "first_bad_step",
    "phase",
    "module",
    "dtype",
    "cause",
    "cause_detail",
    "cause_value",
    "replay_agrees",
    "max_attn_logit",
    "max_grad_norm",
    "nonfinite_grad_frac",
    "nonfinite_param_frac",
    "empty_target_steps",
    "scaler_skips",
    "loss_spikes",
    "initial_loss",
    "final_loss",
    "best_loss",
    "guard_fired",
    "error",
)


class KeepMonitor(Callback):
    def on_train_start(self, trainer, pl_module):
        self.monitor = next(c for c in trainer.callbacks if isinstance(c, NanMonitor))


class PoisonUpdate(Callback):
    """Writes inf into one weight in the optimizer's third update, whoever runs it (the
    trainer, or the monitor's re-run): no mechanism makes finite gradients give non-finite
    weights on the tiny model."""

    def on_train_start(self, trainer, pl_module):
        optimizer = trainer.optimizers[0]
        step, weight = optimizer.step, optimizer.param_groups[0]["params"][-1]

        def poisoned_step(*args, **kwargs):
            out = step(*args, **kwargs)
            if int(optimizer.state[weight]["step"]) == 3:
                with torch.no_grad():
                    weight.view(-1)[0] = float("inf")
            return out

        optimizer.step = poisoned_step


def _run(overrides: list[str], sync_every: int, run_dir, case: str):
    spec = compose_spec(*overrides)
    spec.monitor.sync_every = sync_every
    keep = KeepMonitor()
    extra = [keep, PoisonUpdate()] if case == "optimizer" else [keep]
    return run(spec, run_dir, extra_callbacks=extra), keep.monitor


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.slow) if c == "diverged" else c for c in CASES]
)
def test_deferred_checks_make_the_sync_record(case, tmp_path):
    overrides, n = CASES[case]
    sync, sync_monitor = _run(overrides, 0, tmp_path / "sync", case)  # 0: auto, 1 on CPU
    deferred, deferred_monitor = _run(overrides, n, tmp_path / "deferred", case)
    assert sync_monitor.sync_every == 1 and sync_monitor.deferred is None
    assert deferred_monitor.sync_every == n
    expected = {
        "forward": "nonfinite",
        "backward": "nonfinite",
        "diverged": "diverged",
        "optimizer": "nonfinite",
        "skip_streak": "nonfinite",
        "ok": "ok",
    }[case]
    assert sync.status == expected, sync.verdict()
    if case == "optimizer":
        assert sync.phase == "optimizer" and sync.first_bad_step == 2, sync.verdict()
    fields = FIELDS
    if deferred_monitor.guard is None:
        # the guard's count is put back after a re-run only when the monitor knows the
        # guard (build_callbacks gives it); a runner that builds NanMonitor alone does not
        fields = tuple(f for f in FIELDS if f != "guard_fired")
    for field in fields:
        assert getattr(deferred, field) == getattr(sync, field), field
    history = (tmp_path / "sync" / "history.csv").read_text()
    assert (tmp_path / "deferred" / "history.csv").read_text() == history
    # the steps trained, as sync mode would have: a deferred run trains on past the failure
    # until its read, so the runner's record must take them from the monitor, not the
    # trainer (a non-finite record counts the steps before the failing one)
    assert deferred_monitor.steps_done == sync_monitor.steps_done
    if case == "diverged":
        assert sync.steps_done == sync_monitor.steps_done
    else:
        assert deferred.steps_done == sync.steps_done


HOOKS = (
    "on_train_batch_start",
    "on_before_backward",
    "on_before_optimizer_step",
    "on_train_batch_end",
)


def _host_reads(monkeypatch, sync_every: int, run_dir) -> tuple[list, int]:
    """Every tensor-to-host conversion made inside the monitor's per-step hooks outside its
    reads (on CPU they cost nothing, but they are the calls that wait for a GPU), and the
    number of reads."""
    where: dict = {"hook": None, "reading": False}
    conversions, reads = [], []

    def spy(original, name):
        def fn(self, *args, **kwargs):
            if where["hook"] and not where["reading"]:
                conversions.append((where["hook"], name))
            return original(self, *args, **kwargs)

        return fn

    def watch(original, hook):
        def fn(self, *args, **kwargs):
            where["hook"] = hook
            try:
                return original(self, *args, **kwargs)
            finally:
                where["hook"] = None

        return fn

    def read(self, *args, **kwargs):
        where["reading"] = True
        reads.append(1)
        try:
            return original_read(self, *args, **kwargs)
        finally:
            where["reading"] = False

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, spy(getattr(torch.Tensor, name), name))
    for hook in HOOKS:
        monkeypatch.setattr(NanMonitor, hook, watch(getattr(NanMonitor, hook), hook))
    original_read = DeferredChecks.read
    monkeypatch.setattr(DeferredChecks, "read", read)
    spec = compose_spec(*FAST, "max_steps=8", "monitor.every=0", "serve.enabled=false")
    spec.monitor.sync_every = sync_every
    assert run(spec, run_dir).status in ("ok", "stalled")
    return conversions, len(reads)


def test_deferred_steps_leave_the_checks_on_the_device(tmp_path, monkeypatch):
    conversions, reads = _host_reads(monkeypatch, 4, tmp_path / "deferred")
    assert conversions == [] and reads == 3  # after steps 3 and 7, and at the end
    # the spy sees sync mode's reads: per step, the loss, the gradient norm, the weights
    conversions, reads = _host_reads(monkeypatch, 1, tmp_path / "sync")
    assert reads == 0 and len(conversions) >= 3 * 8


# --- sync mode's weight check every N steps (monitor.PARAMS_EVERY) -------------------------------

# name: the cells above, plus a NaN over zero targets (the run goes on) and the optimizer
# case poisoned late in a window (step 9 of a 16-step window with 12 steps)
EVERY_N = {
    "forward": CASES["forward"][0],
    "backward": CASES["backward"][0],
    "optimizer": CASES["optimizer"][0],
    "skip_streak": [*CASES["skip_streak"][0], "optim.impl=foreach"],  # progressive: fp16 scaler
    "ok": CASES["ok"][0],
    "empty_targets": [*MAP, "stress=empty_targets", *baseline("empty_targets")],
}


def _run_params_every(overrides, every: int, run_dir, case: str, monkeypatch):
    from nanlab.diagnosis import monitor as mon

    monkeypatch.setattr(mon, "PARAMS_EVERY", every)
    spec = compose_spec(*overrides)
    keep = KeepMonitor()
    extra = [keep, PoisonUpdate()] if case == "optimizer" else [keep]
    return run(spec, run_dir, extra_callbacks=extra), keep.monitor


@pytest.mark.parametrize("case", list(EVERY_N))
def test_weights_every_n_steps_make_the_every_step_record(case, tmp_path, monkeypatch):
    """The default on CPU checks the weights every PARAMS_EVERY steps (and before any other
    failure is called), not after every step: the record, history and steps are the same as
    the every-step check's, field by field. Windows of 4 here, so a check falls in mid-run
    and after the poisoned update; 16 (the default) too for the optimizer case."""
    overrides = EVERY_N[case]
    every_step, m1 = _run_params_every(overrides, 1, tmp_path / "every", case, monkeypatch)
    windows = (4, 16) if case == "optimizer" else (4,)
    assert m1.weights is None
    for n in windows:
        rec, mn = _run_params_every(overrides, n, tmp_path / f"n{n}", case, monkeypatch)
        assert mn.sync_every == 1 and mn.deferred is None
        for field in (*FIELDS, "steps_done"):
            assert getattr(rec, field) == getattr(every_step, field), (n, field)
        assert (tmp_path / f"n{n}" / "history.csv").read_text() == (
            tmp_path / "every" / "history.csv"
        ).read_text()
    if case == "optimizer":
        assert every_step.phase == "optimizer" and every_step.first_bad_step == 2
    if case == "empty_targets":
        assert every_step.empty_target_steps > 0
