"""The instrument: a forced NaN is caught, located, recorded, replayed, and reproducible."""

import math
from types import SimpleNamespace

import pytest
import torch

from helpers import FAST, cli
from nanlab.config.specs import GuardSpec
from nanlab.diagnosis.monitor import MonitorSpec, NanMonitor, build_callbacks, check_order
from nanlab.numerics.guards import SkipNonFiniteStep
from nanlab.record import read_record

# random init (model.init=random): the monitor's machinery on a known case
NAN_RUN = [
    "model.init=random",
    "softmax=naive",
    "lr=0.3",
    "precision=fp32",
    "max_steps=12",
    "monitor.every=4",
]


def test_divergence_needs_patience_and_counts_spikes():
    monitor = NanMonitor(MonitorSpec(diverge_factor=4.0, patience=3, spike_factor=2.0))
    trainer = SimpleNamespace(should_stop=False)
    losses = [10, 5, 2, 1, 9, 1, 9, 9, 9, 9]
    for step, loss in enumerate(losses):
        monitor.watch_divergence(trainer, step, float(loss))
        if trainer.should_stop:
            break
    assert monitor.failure.status == "diverged"
    assert monitor.failure.step == 6 and step == 8  # 3 steps above 4 x min(=1) from step 6


def test_spikes_are_counted_without_stopping():
    monitor = NanMonitor(MonitorSpec(diverge_factor=4.0, patience=3, spike_factor=2.0))
    trainer = SimpleNamespace(should_stop=False)
    for step, loss in enumerate([4, 4, 4, 4, 12, 4, 4, 4, 4, 12, 4]):
        monitor.watch_divergence(trainer, step, float(loss))
    assert monitor.spikes == 2 and monitor.failure is None and not trainer.should_stop


def _optimizer_step_hooks(callbacks) -> NanMonitor:
    """on_before_optimizer_step through `callbacks` in list order, as Lightning runs them, on
    a step whose gradient holds a NaN; returns the monitor."""
    layer = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(torch.ones(1, 2)).sum().backward()
    layer.weight.grad[0, 0] = float("nan")
    monitor = next(c for c in callbacks if isinstance(c, NanMonitor))
    monitor.begin_step(({}, None, None))  # (batch, RNG state, precision flag)
    trainer = SimpleNamespace(
        global_step=0,
        max_steps=100,
        should_stop=False,
        loggers=[],
        precision_plugin=SimpleNamespace(),
    )
    module = SimpleNamespace(log=lambda *args, **kwargs: None)
    for callback in callbacks:
        callback.on_before_optimizer_step(trainer, module, optimizer)
    return monitor


def test_the_monitor_sees_gradients_before_skip_step_drops_them():
    callbacks, monitor, guard = build_callbacks(MonitorSpec(), GuardSpec("skip_step"), None)
    assert isinstance(guard, SkipNonFiniteStep) and guard in callbacks
    assert _optimizer_step_hooks(callbacks) is monitor
    assert monitor._skips_in_row == 1 and math.isnan(monitor._grad_norm)  # a skipped step
    assert guard.fired == 1 and monitor.failure is None
    # the other order: the guard drops the NaN gradient first and the monitor sees none
    late = NanMonitor(MonitorSpec(), tolerate_nonfinite_grads=True)
    _optimizer_step_hooks([SkipNonFiniteStep(), late])
    assert late._skips_in_row == 0 and late._grad_norm == 0.0
    with pytest.raises(ValueError, match="NanMonitor must come before SkipNonFiniteStep"):
        check_order([SkipNonFiniteStep(), late])


def test_build_callbacks_without_a_skipping_guard():
    callbacks, monitor, guard = build_callbacks(MonitorSpec(), GuardSpec("none"), None)
    assert callbacks == [monitor] and guard is None and not monitor.tolerate_grads


@pytest.mark.slow  # the CLI end to end, then python -m src.replay: ~30 s
def test_forced_nan_run_exits_0_with_verdict_record_and_same_replay(tmp_path):
    out = cli(*FAST, *NAN_RUN, f"hydra.run.dir={tmp_path / 'a'}")
    assert out.returncode == 0, out.stderr[-2000:]
    verdict = [line for line in out.stdout.splitlines() if line.startswith("NON-FINITE")]
    assert len(verdict) == 1 and "model.visual.blocks.0.attn" in verdict[0]
    rec = read_record(tmp_path / "a" / "record.json")
    assert rec.status == "nonfinite" and rec.phase == "forward"
    assert rec.module == "model.visual.blocks.0.attn" and rec.dtype == "float32"
    assert rec.replay_agrees is True
    assert rec.cause == "exp_overflow" and rec.cause_value > 88.72  # ln(max float32)
    assert rec.max_attn_logit >= rec.cause_value  # the failing step's logits are counted
    assert rec.first_bad_step is not None and 0 < rec.first_bad_step < 12
    assert rec.steps_done == rec.first_bad_step  # stopped cleanly at the failing step
    assert (tmp_path / "a" / "failing_batch.pt").exists()
    history = (tmp_path / "a" / "history.csv").read_text().splitlines()
    assert len(history) == rec.first_bad_step + 2  # header + steps 0..k
    assert math.isnan(float(history[-1].split(",")[1]))

    # the same config and seed give the same record
    again = cli(*FAST, *NAN_RUN, f"hydra.run.dir={tmp_path / 'b'}")
    rec2 = read_record(tmp_path / "b" / "record.json")
    for field in (
        "status",
        "first_bad_step",
        "phase",
        "module",
        "dtype",
        "final_loss",
        "max_grad_norm",
        "config_hash",
    ):
        assert getattr(rec, field) == getattr(rec2, field), field
    assert again.returncode == 0

    # replay: reruns the recorded config and checks the failure and the batch
    replay = cli(str(tmp_path / "a"), "--out", str(tmp_path / "replay"), module="src.replay")
    assert replay.returncode == 0, replay.stdout + replay.stderr[-2000:]
    assert "replay agrees" in replay.stdout
    assert read_record(tmp_path / "replay" / "record.json").module == rec.module


def test_auto_defers_on_cuda_only_where_the_snapshot_fits(monkeypatch, capsys):
    """sync_every=0 on CUDA: deferred checks keep ~3x the trainable weights; with AdamW's
    2x still to come, a device without 6x free reads every step instead (and says so)."""
    from nanlab.diagnosis import monitor as mon

    model = torch.nn.Linear(256, 256)  # 257 * 256 fp32 parameters
    trainable = sum(p.numel() * p.element_size() for p in model.parameters())
    model.device = torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (6 * trainable, 0))
    assert mon._snapshot_fits(model)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (6 * trainable - 1, 0))
    assert not mon._snapshot_fits(model)
    assert "sync_every=1" in capsys.readouterr().out


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16_true"])
def test_clipping_with_the_monitors_norm_is_bitwise_the_usual_clip(
    precision, tmp_path, monkeypatch
):
    """The monitor hands its gradient norm to clipping (one pass over the gradients, not
    two) only where it is what clip_grad_norm_ computes: the same losses, norms and weights
    as Lightning's own clipping (bf16_true: bf16 gradients, the usual path)."""
    import lightning as L

    from helpers import spec
    from nanlab.run.module import NanLabModule
    from nanlab.run.runner import run

    overrides = (
        f"precision={precision}",
        "clip=0.05",
        "max_steps=4",
        "serve.enabled=false",
        "lr_x=1",
    )
    seen = []
    usual = NanLabModule.configure_gradient_clipping

    def spy(self, *args, **kwargs):
        seen.append(self.grad_norm_seen is not None)
        return usual(self, *args, **kwargs)

    monkeypatch.setattr(NanLabModule, "configure_gradient_clipping", spy)
    reused = run(spec(*overrides), tmp_path / "reused")
    monkeypatch.setattr(
        NanLabModule, "configure_gradient_clipping", L.LightningModule.configure_gradient_clipping
    )
    plain = run(spec(*overrides), tmp_path / "plain")
    assert reused.status == plain.status and reused.steps_done == plain.steps_done == 4
    history = [(tmp_path / d / "history.csv").read_text() for d in ("reused", "plain")]
    assert history[0] == history[1]
    assert reused.final_loss == plain.final_loss
    assert all(seen) if precision != "bf16_true" else not any(seen), seen
