"""Locating the first non-finite value: the innermost module in forward order, the module
whose backward made a gradient non-finite."""

import torch

from nanlab.diagnosis.locate import first_nonfinite_forward, hooked_backward


class Sqrt(torch.nn.Module):
    def forward(self, x):
        return x.sqrt()


def test_forward_locator_names_the_innermost_first_bad_module():
    net = torch.nn.Sequential(
        torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.Linear(2, 2)), torch.nn.Linear(2, 2)
    )
    with torch.no_grad():
        net[1][0].weight.fill_(float("inf"))
    name, dtype, out = first_nonfinite_forward(net, lambda: net(torch.ones(1, 2)))
    assert name == "1.0" and dtype == "float32" and not torch.isfinite(out).all()


def test_backward_locator_names_the_module_that_made_the_gradient_non_finite():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), Sqrt(), torch.nn.Linear(2, 1))
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].bias.zero_()  # sqrt(0): finite forward, infinite derivative
    name, dtype = hooked_backward(
        net, lambda: net(torch.ones(1, 2)).sum(), lambda loss: loss.backward()
    )
    assert name == "1" and dtype == "float32"
