"""One build path, specs -> parts, for both entry points: a training run (src/runner.py)
and the test-time probe (src/probe.py) get their processor, model, attention variant,
mechanism and precision plugin from here, so a probe sees the model exactly as training
built it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from nanlab.config.specs import DataSpec, ModelSpec, PrecisionSpec, SoftmaxSpec, StressSpec


@dataclass
class Parts:
    processor: object
    model: object                  # Qwen2_5_VLForConditionalGeneration (or a peft wrapper)
    plugin: object                 # the Lightning precision plugin
    device: str                    # cpu | cuda
    batch_transform: Callable | None = None  # stress=grad_poison's per-step padding
    precision_callbacks: list = field(default_factory=list)  # progressive's switch

    @property
    def half_gemm(self) -> str:
        """How half-precision matmuls ran: native, or fp32_accumulate on CPUs without them."""
        return getattr(self.plugin, "half_gemm", "native")


def pick_device(requested: str) -> str:
    """cpu when asked or when there is no GPU; cuda otherwise (auto, gpu, cuda)."""
    import torch

    if requested == "cpu":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_parts(model: ModelSpec, data: DataSpec, softmax: SoftmaxSpec, stress: StressSpec,
                precision: PrecisionSpec, seed: int, device: str) -> Parts:
    """Processor, model with the attention variant plugged in, and the precision plugin.
    Weight-level mechanisms need a batch to calibrate on: `plant_stress` once one exists."""
    from nanlab.model.processing import load_processor
    from nanlab.model.qwen_vl import build_model
    from nanlab.numerics import attention
    from nanlab.numerics import precision as precisions
    from nanlab.numerics import stress as stresses

    processor = load_processor(data.processor_spec(), model.path)
    built = build_model(model, seed)
    attention.apply(built, softmax, stress.mask)
    plugin, callbacks = precisions.build_plugin(precision, device)
    return Parts(processor=processor, model=built, plugin=plugin, device=device,
                 batch_transform=stresses.batch_transform(stress,
                                                          processor.tokenizer.pad_token_id),
                 precision_callbacks=callbacks)


def plant_stress(parts: Parts, stress: StressSpec, batch: dict, compute_loss: Callable) -> None:
    """logit_growth and fp16_overflow change the weights, calibrated on one batch so they
    hold whatever the init; the other mechanisms live in the data, mask or schedule."""
    from nanlab.numerics import stress as stresses

    if stress.name in stresses.NEEDS_MODEL:
        token_id = parts.processor.tokenizer.convert_tokens_to_ids(stress.token)
        stresses.apply_to_model(stress, parts.model, batch, compute_loss, token_id)
