"""Lightning precision plugins for the study's precision axis.

- fp32, bf16 (bf16 autocast), bf16_true (weights in bf16), fp16 (fp16 autocast + loss
  scaler), progressive (fp32 for `switch_step` steps, then bf16 autocast).
- fp16 on CPU: `Trainer(precision="16-mixed")` on CPU silently becomes bf16-mixed in
  Lightning. We pass the plugin instance ourselves, which Lightning does not rewrite, so
  fp16 really runs in fp16.
- Half-precision matmuls on CPUs without native bf16/fp16 GEMM (AVX2 only: ~1 GFLOP/s,
  12 s a step for the tiny model) run as "fp32-accumulate": inputs and outputs stay in the
  half dtype, the product is computed in fp32 and rounded once, which is what GPU tensor
  cores (and AMX) do. `precision.half_gemm=native` turns it off.
"""

from __future__ import annotations

import contextlib
from typing import ClassVar

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import HalfPrecision, MixedPrecision, Precision
from torch.utils._python_dispatch import TorchDispatchMode

from nanlab.config.options import PRECISION
from nanlab.config.specs import HALF_GEMMS, PrecisionSpec

HALF = (torch.bfloat16, torch.float16)
aten = torch.ops.aten


class Fp32AccumulatedHalfGemm(TorchDispatchMode):
    """mm/bmm/addmm/baddbmm on half tensors: upcast, multiply in fp32, round the result
    back to the half dtype. Overflow past the half range still becomes inf."""

    OPS: ClassVar[dict] = {
        aten.mm.default: 0,
        aten.bmm.default: 0,
        aten.addmm.default: 1,
        aten.baddbmm.default: 1,
    }

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        i = self.OPS.get(func)
        if i is not None and args[i].dtype in HALF:
            dtype = args[i].dtype
            args = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
            return func(*args, **kwargs).to(dtype)
        return func(*args, **kwargs)


def native_half_gemm() -> bool:
    """True where the CPU has bf16/fp16 matrix instructions (AVX512-BF16, AMX)."""
    return torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "NO AVX", "AVX2")


def half_gemm_mode(spec: PrecisionSpec, device: str) -> str:
    if spec.half_gemm not in HALF_GEMMS:
        raise ValueError(f"precision.half_gemm={spec.half_gemm}: allowed {', '.join(HALF_GEMMS)}")
    if spec.name == "fp32" or device != "cpu":
        return "native"
    if spec.half_gemm == "auto":
        return "native" if native_half_gemm() else "fp32_accumulate"
    return spec.half_gemm


class _GemmMixin:
    """Runs forward and backward under the fp32-accumulate dispatch mode when asked."""

    half_gemm: str = "native"

    def _gemm(self):
        if self.half_gemm == "fp32_accumulate":
            return Fp32AccumulatedHalfGemm()
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def forward_context(self):
        with self._gemm(), super().forward_context():
            yield

    def backward_context(self):
        return self._gemm()

    def backward(self, tensor, model, optimizer, *args, **kwargs):
        with self.backward_context():
            return super().backward(tensor, model, optimizer, *args, **kwargs)


class CpuAwareMixed(_GemmMixin, MixedPrecision):
    pass


class CpuAwareHalf(_GemmMixin, HalfPrecision):
    pass


class ProgressiveMixed(CpuAwareMixed):
    """fp32 until `active` is set (by ProgressiveSwitch), then bf16 autocast."""

    active = False

    @contextlib.contextmanager
    def forward_context(self):
        ctx = super().forward_context() if self.active else contextlib.nullcontext()
        with ctx:
            yield

    def backward_context(self):
        return self._gemm() if self.active else contextlib.nullcontext()

    def backward(self, tensor, model, optimizer, *args, **kwargs):
        if self.active:
            return super().backward(tensor, model, optimizer, *args, **kwargs)
        return Precision.backward(self, tensor, model, optimizer, *args, **kwargs)


class ProgressiveSwitch(Callback):
    """Turns bf16 on at `switch_step` (the seed's "start in fp32, move to bf16 once stable")."""

    def __init__(self, plugin: ProgressiveMixed, switch_step: int):
        self.plugin, self.switch_step = plugin, switch_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.plugin.active = trainer.global_step >= self.switch_step


def build_plugin(spec: PrecisionSpec, device: str) -> tuple[Precision, list[Callback]]:
    """The Lightning precision plugin (and any callback it needs) for a precision option
    (nanlab.config.options.PRECISION names each option's builder below)."""
    spec.check()  # the spec's own rules (specs.py), for callers that built it by hand
    plugin, callbacks = PRECISION[spec.name].resolve("plugin")(spec, device)
    plugin.half_gemm = half_gemm_mode(spec, device)
    return plugin, callbacks


def fp32_plugin(spec: PrecisionSpec, device: str):
    return Precision(), []


def bf16_plugin(spec: PrecisionSpec, device: str):
    return CpuAwareMixed("bf16-mixed", device), []


def fp16_plugin(spec: PrecisionSpec, device: str):
    return CpuAwareMixed("16-mixed", device, scaler=torch.amp.GradScaler(device=device)), []


def bf16_true_plugin(spec: PrecisionSpec, device: str):
    return CpuAwareHalf("bf16-true"), []


def progressive_plugin(spec: PrecisionSpec, device: str):
    plugin = ProgressiveMixed("bf16-mixed", device)
    return plugin, [ProgressiveSwitch(plugin, spec.switch_step)]
