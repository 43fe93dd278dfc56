"""ProLU (seed 003): m * 1[m + b > 0 and m > 0] with m = W_enc(x - b_dec); the bias only gates."""

from __future__ import annotations

import torch

from saex.sae.arch.base import Architecture, TrainContext, dense_output, weighted_l1
from saex.sae.code import Code


class ProLUFn(torch.autograd.Function):
    """With G = 1[m + b > 0 and m > 0] and upstream g:
    relu variant: dm = db = g G;  ste variant: db = g G m, dm = g G (1 + m)."""

    @staticmethod
    def forward(ctx, m, b, ste: bool):
        gate = (m + b > 0) & (m > 0)
        ctx.save_for_backward(m, gate)
        ctx.ste = ste
        return m * gate

    @staticmethod
    def backward(ctx, grad):
        m, gate = ctx.saved_tensors
        g = grad * gate
        if ctx.ste:
            grad_m, grad_b = g * (1 + m), g * m
        else:
            grad_m, grad_b = g, g
        return grad_m, grad_b.reshape(-1, m.shape[-1]).sum(0), None


class ProLU(Architecture):
    saelens_name = "prolu"  # no SAELens equivalent

    def encode(self, sae, x_BD) -> Code:
        m = sae.pre_acts(x_BD, bias=False)
        return Code.from_dense(m * ((m + sae.b_enc > 0) & (m > 0)))

    def train_forward(self, sae, x_BD, ctx: TrainContext):
        m = sae.pre_acts(x_BD, bias=False)
        f_BS = ProLUFn.apply(m, sae.b_enc, self.cfg.prolu_grad == "ste")
        l1 = weighted_l1(f_BS, sae.W_dec.norm(dim=1))
        return dense_output(sae, x_BD, f_BS, {"sparsity": ctx.sparsity_coefficient * l1})
