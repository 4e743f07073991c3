"""The project's StableAdamW (nanlab/run/module.py) against torch-optimi's, a maintained
implementation of the same update (Wortsman et al. 2023): same trajectory in fp32, with the
update clipping firing. The project keeps its own class because optimi's StableAdamW reads
each tensor's RMS with one host sync per tensor (`.item()` in its loop), where ours reads all
of a group's in one (`tolist()`); the numerics are what this test holds equal."""

from __future__ import annotations

import pytest
import torch

from nanlab.run.module import StableAdamW

optimi = pytest.importorskip("optimi")


def _trajectory(make, steps: int = 8, seed: int = 0) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(16, 8) * 0.1), torch.nn.Parameter(torch.randn(8))]
    opt = make(params)
    g = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        for p in params:
            grad = torch.randn(p.shape, generator=g) * 0.01
            p.grad = grad * (100.0 if step == 4 else 1.0)  # a spike v does not remember
        opt.step()
    return [p.detach().clone() for p in params], opt


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_same_updates_as_torch_optimi(weight_decay):
    kw = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": weight_decay}
    ours, _ = _trajectory(lambda ps: StableAdamW(ps, **kw))
    theirs, _ = _trajectory(lambda ps: optimi.StableAdamW(ps, foreach=False, kahan_sum=False, **kw))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_the_spike_is_clipped():
    """The comparison above covers clipping: at the spike every tensor's RMS is > 1."""
    kw = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8}
    _, opt = _trajectory(lambda ps: StableAdamW(ps, **kw), steps=5)
    assert min(opt.last_rms) > 1.0
