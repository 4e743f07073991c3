"""Guards: skip_step leaves weights untouched on a non-finite gradient; clamp keeps fp16
hidden states finite."""

import pytest
import torch

from helpers import spec
from nanlab.model.qwen_vl import build_model
from nanlab.numerics import guards
from nanlab.numerics.guards import GuardSpec
from nanlab.run.runner import run


def test_skip_step_drops_the_update_and_counts_it():
    layer = torch.nn.Linear(3, 3)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1)
    before = [p.detach().clone() for p in layer.parameters()]
    layer(torch.ones(1, 3)).sum().backward()
    layer.weight.grad[0, 0] = float("nan")
    skip = guards.SkipNonFiniteStep()
    skip.on_before_optimizer_step(None, None, opt)
    opt.step()
    assert skip.fired == 1
    for p, b in zip(layer.parameters(), before):
        assert torch.equal(p, b)
    # a finite step goes through
    layer(torch.ones(1, 3)).sum().backward()
    skip.on_before_optimizer_step(None, None, opt)
    opt.step()
    assert skip.fired == 1 and not torch.equal(layer.weight, before[0])


def test_clamp_hooks_every_block_and_clamps_only_fp16():
    model = build_model(spec().model, seed=0)
    clamp = guards.ClampHalfHidden(model)
    assert len(clamp.handles) == 4  # 2 vision blocks + 2 decoder layers
    block = model.model.language_model.layers[0]
    limit = torch.finfo(torch.float16).max - 1000
    out = clamp._hook(block, (), torch.tensor([float("inf"), -7e4, 1.0], dtype=torch.float16))
    assert torch.equal(out, torch.tensor([limit, -limit, 1.0], dtype=torch.float16))
    assert clamp.fired == 1
    big = torch.tensor([1e6])
    assert clamp._hook(block, (), big) is None  # fp32, no autocast: untouched
    clamp.remove()


@pytest.mark.slow
def test_guards_rescue_the_runs_they_claim(tmp_path):
    """fp16 with a massive activation breaks in the down projection; clamping the blocks'
    outputs (vLLM) keeps it finite. One poisoned gradient every few steps breaks bf16;
    skipping those steps keeps it training."""
    base = ["experiment=nan_map_base", "logger=none", "lr_x=1"]  # the map's 20 steps
    broken = run(spec(*base, "precision=fp16", "stress=fp16_overflow", fast=False), tmp_path / "a")
    rescued = run(
        spec(*base, "precision=fp16", "stress=fp16_overflow", "guard=clamp", fast=False),
        tmp_path / "b",
    )
    assert broken.status == "nonfinite" and broken.cause == "half_overflow"
    assert broken.module == "model.language_model.layers.0.mlp.down_proj"
    assert rescued.status == "ok" and rescued.guard_fired > 0
    poison = ["stress=grad_poison", "softmax=zeroed", "clip=0"]
    poisoned = run(spec(*base, *poison, fast=False), tmp_path / "c")
    skipped = run(spec(*base, *poison, "guard=skip_step", fast=False), tmp_path / "d")
    assert poisoned.status == "nonfinite" and poisoned.cause == "grad_nonfinite"
    assert skipped.status == "ok" and skipped.guard_fired == 5  # steps 3, 7, 11, 15, 19


def test_unknown_guard_is_one_line_error():
    import pytest

    with pytest.raises(
        ValueError, match=r"^guard=helmet: unknown option; allowed: clamp, none, skip_step"
    ):
        guards.build_guard(GuardSpec("helmet"), None)
