"""JumpReLU (Rajamanoharan et al. 2024): f = z H(z - theta), an L0 penalty, straight-through gradients.

The threshold is stored directly (not as log theta, which Adam barely moves)."""

from __future__ import annotations

import torch
from torch import nn

from saex.sae.arch.base import Architecture, TrainContext, dense_output
from saex.sae.code import Code


def rectangle(u: torch.Tensor) -> torch.Tensor:
    return (u.abs() < 0.5).to(u.dtype)


class JumpReLUFn(torch.autograd.Function):
    """z * H(z - theta); d/dz = H(z - theta), d/dtheta = -(theta / eps) K((z - theta) / eps)."""

    @staticmethod
    def forward(ctx, z, theta, eps: float):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta)

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        grad_z = grad * (z > theta)
        grad_theta = -(theta / ctx.eps) * rectangle((z - theta) / ctx.eps) * grad
        return grad_z, grad_theta.reshape(-1, theta.shape[-1]).sum(0), None


class StepFn(torch.autograd.Function):
    """H(z - theta); d/dz = 0, d/dtheta = -(1 / eps) K((z - theta) / eps)."""

    @staticmethod
    def forward(ctx, z, theta, eps: float):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        grad_theta = -(1.0 / ctx.eps) * rectangle((z - theta) / ctx.eps) * grad
        return torch.zeros_like(z), grad_theta.reshape(-1, theta.shape[-1]).sum(0), None


class JumpReLU(Architecture):
    saelens_name = "jumprelu"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.threshold = nn.Parameter(torch.full((cfg.d_sae,), float(cfg.jumprelu_threshold)))

    def encode(self, sae, x_BD) -> Code:
        z = sae.pre_acts(x_BD)
        return Code.from_dense(z * (z > self.threshold))

    @torch.no_grad()
    def init_from_data(self, sae, x_ND) -> None:
        """Start each threshold where its latent fires on a fraction k / d_sae of the sample, so that the
        initial L0 is about k: the L0 penalty then holds it there instead of having to drag thresholds
        up while the encoder grows to outrun them."""
        if self.cfg.jumprelu_init_l0 <= 0:
            return
        z = sae.pre_acts(x_ND)
        q = 1 - min(self.cfg.jumprelu_init_l0 / sae.d_sae, 1.0)
        self.threshold.copy_(torch.quantile(z, q, dim=0).clamp_min(1e-3))

    def train_forward(self, sae, x_BD, ctx: TrainContext):
        z_BS = sae.pre_acts(x_BD)
        eps = self.cfg.jumprelu_bandwidth
        f_BS = JumpReLUFn.apply(z_BS, self.threshold, eps)
        l0 = StepFn.apply(z_BS, self.threshold, eps).sum(-1).mean()
        return dense_output(sae, x_BD, f_BS, {"sparsity": ctx.sparsity_coefficient * l0})

    def after_optimizer_step(self, sae) -> None:
        self.threshold.data.clamp_(min=1e-6)

    def inference_state(self, sae):
        return "jumprelu", {"threshold": self.threshold.detach().clone()}
