"""float64 gradchecks of the custom autograd functions where their gradients are true gradients, and
their straight-through (pseudo-)gradients against the formulas of reference/algorithms.md."""

import pytest
import torch
from torch.autograd import gradcheck

from saex.sae.arch.jumprelu import JumpReLUFn, StepFn
from saex.sae.arch.prolu import ProLUFn

EPS = 0.1


def _away_from(z, theta, margin):
    """Move entries of z at least `margin` away from the threshold so the function is smooth there."""
    gap = z - theta
    return torch.where(gap.abs() < margin, theta + margin * torch.sign(gap + 1e-9) * 2, z)


def test_jumprelu_gradcheck_in_z():
    theta = torch.rand(6, dtype=torch.float64) * 0.5 + 0.1
    z = _away_from(torch.randn(5, 6, dtype=torch.float64), theta, 0.05).requires_grad_()
    assert gradcheck(lambda z: JumpReLUFn.apply(z, theta, EPS), (z,), eps=1e-6, atol=1e-5)


def test_jumprelu_threshold_gradient_is_the_kernel_estimate():
    theta = torch.tensor([0.5, 0.5], dtype=torch.float64, requires_grad=True)
    z = torch.tensor([[0.52, 0.9], [0.46, 0.56], [0.1, 0.549]], dtype=torch.float64, requires_grad=True)
    g = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=torch.float64)
    JumpReLUFn.apply(z, theta, EPS).backward(g)
    # -(theta/eps) K((z - theta)/eps) with K = 1[|u| < 1/2]: inside the window when |z - 0.5| < 0.05
    inside = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(theta.grad, (-(0.5 / EPS) * inside * g).sum(0))
    assert torch.equal(z.grad, g * (z > theta).double())


def test_step_gradients():
    theta = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
    z = torch.tensor([[0.53], [0.2], [0.48]], dtype=torch.float64, requires_grad=True)
    out = StepFn.apply(z, theta, EPS)
    assert out.squeeze().tolist() == [1.0, 0.0, 0.0]
    out.sum().backward()
    assert theta.grad.item() == pytest.approx(-2 / EPS)  # two entries inside the kernel window
    assert torch.equal(z.grad, torch.zeros_like(z))


def _prolu_inputs():
    m = torch.randn(7, 5, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)
    m = torch.where((m.abs() < 0.05) | ((m + b).abs() < 0.05), m + 0.2, m)  # off the kinks
    return m, b


def test_prolu_relu_gradcheck_in_m():
    m, b = _prolu_inputs()
    assert gradcheck(lambda m: ProLUFn.apply(m, b, False), (m.requires_grad_(),), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("ste", [False, True])
def test_prolu_pseudo_gradients(ste):
    m, b = _prolu_inputs()
    m.requires_grad_()
    b.requires_grad_()
    g = torch.randn(7, 5, dtype=torch.float64)
    out = ProLUFn.apply(m, b, ste)
    gate = ((m + b > 0) & (m > 0)).double()
    assert torch.equal(out, m * gate)
    out.backward(g)
    if ste:  # seed 003: db = g G m, dm = g G (1 + m)
        assert torch.allclose(b.grad, (g * gate * m).sum(0))
        assert torch.allclose(m.grad, g * gate * (1 + m))
    else:  # dm = db = g G
        assert torch.allclose(b.grad, (g * gate).sum(0))
        assert torch.allclose(m.grad, g * gate)
