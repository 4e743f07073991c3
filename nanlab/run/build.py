"""One build path, specs -> parts, for both entry points: a training run (nanlab/run/runner.py)
and the test-time probe (nanlab/probe.py) get their processor, model, attention variant,
mechanism and precision plugin from here, so a probe sees the model exactly as training
built it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nanlab.config.specs import DataSpec, ModelSpec, PrecisionSpec, SoftmaxSpec, StressSpec


@dataclass
class Parts:
    processor: Any
    model: Any  # Qwen2_5_VLForConditionalGeneration (or a peft wrapper)
    plugin: Any  # the Lightning precision plugin
    device: str  # cpu | cuda
    batch_transform: Callable | None = None  # a mechanism's per-step batch transform
    lr_multiplier: Callable | None = None  # a mechanism's multiplier of the lr schedule
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


def build_parts(
    model: ModelSpec,
    data: DataSpec,
    softmax: SoftmaxSpec,
    stress: StressSpec,
    precision: PrecisionSpec,
    seed: int,
    device: str,
    first_batch: Callable[[Parts], dict] | None = None,
) -> Parts:
    """Processor, model with the attention variant plugged in and the mechanism planted, and
    the precision plugin. A mechanism that changes the weights (its `model` role in
    nanlab.config.options.STRESS) is calibrated on one batch so it holds whatever the init:
    `first_batch(parts)` gives it (the run's first training batch, the probe's first)."""
    from nanlab.model.processing import load_processor
    from nanlab.model.qwen_vl import build_model
    from nanlab.numerics import attention
    from nanlab.numerics import precision as precisions
    from nanlab.numerics import stress as stresses

    processor = load_processor(data.processor_spec(), model.path)
    built = build_model(model, seed)
    attention.apply(built, softmax, stress.mask)
    plugin, callbacks = precisions.build_plugin(precision, device)
    parts = Parts(
        processor=processor,
        model=built,
        plugin=plugin,
        device=device,
        batch_transform=stresses.batch_transform(stress, processor.tokenizer.pad_token_id),
        lr_multiplier=stresses.lr_multiplier(stress),
        precision_callbacks=callbacks,
    )
    if stresses.needs_model(stress):
        if first_batch is None:
            raise ValueError(
                f"stress={stress.name}: changes the weights and is calibrated on "
                "a batch; build_parts needs first_batch"
            )
        _plant(parts, stress, first_batch(parts))
    return parts


def _plant(parts: Parts, stress: StressSpec, batch: dict) -> None:
    """Calibrated in fp32 on the forward of one batch (only the forward's statistics
    matter, so the objective's extra terms, e.g. z-loss, do not)."""
    from nanlab.loss import supervised_loss
    from nanlab.numerics import stress as stresses

    token_id = parts.processor.tokenizer.convert_tokens_to_ids(stress.token)
    stresses.apply_to_model(
        stress, parts.model, batch, lambda b: supervised_loss(parts.model, b), token_id
    )
