"""Precision plugins: fp16 really is fp16 on CPU, the half GEMM mode, progressive switching."""

import lightning as L
import pytest
import torch

from helpers import spec
from nanlab.numerics import precision
from nanlab.numerics.precision import Fp32AccumulatedHalfGemm, PrecisionSpec
from nanlab.run.runner import run


def test_lightning_alone_would_swap_fp16_for_bf16_on_cpu():
    """The trap this module exists for: Trainer(precision="16-mixed") on CPU runs bf16."""
    trainer = L.Trainer(accelerator="cpu", precision="16-mixed", logger=False)
    assert trainer.precision_plugin.precision == "bf16-mixed"


@pytest.mark.parametrize(
    "name,dtype",
    [
        ("fp32", "float32"),
        ("bf16", "bfloat16"),
        ("bf16_true", "bfloat16"),
        ("fp16", "float16"),
        ("progressive", "bfloat16"),
    ],
)
def test_attention_runs_in_the_configured_dtype(name, dtype, tmp_path):
    """A real Trainer run: the dtype the attention probabilities were computed in."""
    s = spec(f"precision={name}", "softmax=stable", "precision.switch_step=1")
    record = run(s, tmp_path)
    assert record.status in ("ok", "stalled"), record.error  # finite: 3 steps may not train
    assert record.steps_done == 3
    assert record.dtype == dtype  # the last statistics step is after the progressive switch


def test_our_fp16_plugin_keeps_fp16_with_a_scaler():
    plugin, _ = precision.build_plugin(PrecisionSpec("fp16"), "cpu")
    assert plugin.precision == "16-mixed" and plugin.scaler is not None
    with plugin.forward_context():
        x = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert x.dtype == torch.float16


def test_progressive_switches_at_the_configured_step():
    plugin, callbacks = precision.build_plugin(PrecisionSpec("progressive", switch_step=5), "cpu")
    switch = callbacks[0]
    seen = []
    for step in range(8):
        trainer = type("T", (), {"global_step": step})()
        switch.on_train_batch_start(trainer, None, None, step)
        with plugin.forward_context():
            seen.append(torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype)
    assert seen == [torch.float32] * 5 + [torch.bfloat16] * 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_accumulate_gemm_matches_native_and_keeps_dtype(dtype):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(33, 65, generator=g).to(dtype)
    b = torch.randn(65, 17, generator=g).to(dtype)
    native = a @ b
    with Fp32AccumulatedHalfGemm():
        emulated = a @ b
        batched = torch.bmm(a[None], b[None])
        fused = torch.addmm(torch.zeros(17, dtype=dtype), a, b)
    for out in (emulated, batched[0], fused):
        assert out.dtype == dtype
        # both accumulate in fp32 and round once: at most one rounding step apart
        torch.testing.assert_close(out.float(), native.float(), atol=0.05, rtol=2**-7)


def test_fp32_accumulate_gemm_still_overflows_fp16():
    a = torch.full((2, 2), 300.0, dtype=torch.float16)
    with Fp32AccumulatedHalfGemm():
        out = a @ a  # 180,000 > 65,504
    assert torch.isinf(out).all()


def test_half_gemm_mode_choice():
    assert precision.half_gemm_mode(PrecisionSpec("fp32"), "cpu") == "native"
    assert precision.half_gemm_mode(PrecisionSpec("bf16", half_gemm="native"), "cpu") == "native"
    forced = PrecisionSpec("bf16", half_gemm="fp32_accumulate")
    assert precision.half_gemm_mode(forced, "cpu") == "fp32_accumulate"
    assert precision.half_gemm_mode(forced, "cuda") == "native"
    with pytest.raises(ValueError, match=r"^precision.half_gemm=fast: allowed auto"):
        precision.half_gemm_mode(PrecisionSpec("bf16", half_gemm="fast"), "cpu")


def test_unknown_precision_is_one_line_error():
    with pytest.raises(
        ValueError, match=r"^precision=fp8: unknown option; allowed: bf16, bf16_true, fp16, fp32"
    ):
        precision.build_plugin(PrecisionSpec("fp8"), "cpu")


def test_the_monitor_snapshots_the_precision_each_step_runs_in(tmp_path):
    """A failure replays in the precision of its step: progressive's switch must set the
    flag before the monitor keeps it, at the switch step too."""
    from lightning.pytorch.callbacks import Callback

    from nanlab.diagnosis.monitor import NanMonitor

    class Spy(Callback):
        def __init__(self):
            self.pairs = []

        def on_before_backward(self, trainer, pl_module, loss):
            monitor = next(c for c in trainer.callbacks if isinstance(c, NanMonitor))
            self.pairs.append((monitor._snapshot[2], trainer.precision_plugin.active))

    spy = Spy()
    rec = run(
        spec(
            "precision=progressive", "precision.switch_step=1", "max_steps=3", "serve.enabled=false"
        ),
        tmp_path,
        extra_callbacks=[spy],
    )
    assert rec.steps_done == 3
    assert spy.pairs == [(False, False), (True, True), (True, True)], spy.pairs
