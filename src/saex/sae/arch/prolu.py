"""ProLU (seed 003): m * 1[m + b > 0 and m > 0] with m = W_enc(x - b_dec); the bias only gates.

Every gradient lives on the entries that pass the gate (m > max(-b, 0)), so once codes are sparse a
step keeps only those, through the sparse kernels (saex.sae.arch.base.RoutedByDensity)."""

from __future__ import annotations

import torch

from saex.sae.arch.base import RoutedByDensity, TrainContext, TrainOutput, dense_output, sum_sq, weighted_l1
from saex.sae.code import Bags, Code, active_counts
from saex.sae.kernels import decode, sparse_encode
from saex.sae.kernels.encode import positive_code
from saex.sae.kernels.precision import select_dtype


class ProLUFn(torch.autograd.Function):
    """With G = 1[m + b > 0 and m > 0] and upstream g:
    relu variant: dm = db = g G;  ste variant: db = g G m, dm = g G (1 + m).
    m is [..., S] with b [S], or flat entries [N] with their latents' b [N]."""

    @staticmethod
    def forward(ctx, m, b, ste: bool):
        gate = (m + b > 0) & (m > 0)
        ctx.save_for_backward(m, gate)
        ctx.ste, ctx.b_shape = ste, b.shape
        return m * gate

    @staticmethod
    def backward(ctx, grad):
        m, gate = ctx.saved_tensors
        g = grad * gate
        if ctx.ste:
            grad_m, grad_b = g * (1 + m), g * m
        else:
            grad_m, grad_b = g, g
        # flat entries (which may be none) take their gradient as it is; a [..., S] m sums over its rows
        return grad_m, grad_b if grad_b.shape == ctx.b_shape else grad_b.reshape(-1, m.shape[-1]).sum(0), None


class ProLU(RoutedByDensity):
    saelens_name = "jumprelu"  # at inference, what SAELens' JumpReLU computes (inference_state)
    sparse_max_density = 1 / 32  # as ReLU's: the same kernels

    def encode(self, sae, x_BD) -> Code:
        m = sae.pre_acts(x_BD, bias=False)
        return Code.from_dense(m * ((m + sae.b_enc > 0) & (m > 0)))

    def sparse_forward(self, sae, x_BD, ctx: TrainContext) -> TrainOutput:
        b = sae.b_enc
        # m has no bias: the encoder's is a zero that asks for no gradient; b reaches f through ProLUFn
        code = sparse_encode(x_BD, sae.W_enc_SD, torch.zeros_like(b, requires_grad=False), sae.b_in,
                             lambda m: positive_code(m, -b), select_dtype(self.cfg, x_BD))
        f = Bags(ProLUFn.apply(code.values_N, b[code.indices_N], self.cfg.prolu_grad == "ste"), code.indices_N,
                 code.offsets, sae.d_sae)
        x_hat = decode(sae.W_dec, f.values_N, f.indices_N, f.offsets) + sae.b_dec
        l1 = (f.values_N * sae.W_dec.norm(dim=1)[f.indices_N]).sum() / len(x_BD)
        losses = {"mse": sum_sq(ctx.target(x_BD), x_hat), "sparsity": ctx.sparsity_coefficient * l1}
        # counted on f, as the dense path counts: the gate may still close an entry (a NaN bias)
        return TrainOutput(x_hat, losses, f.fired(), active_counts(f.values_N.detach() != 0, 0).float() / len(x_BD))

    def dense_forward(self, sae, x_BD, ctx: TrainContext) -> TrainOutput:
        m = sae.pre_acts(x_BD, bias=False)
        f_BS = ProLUFn.apply(m, sae.b_enc, self.cfg.prolu_grad == "ste")
        l1 = weighted_l1(f_BS, sae.W_dec.norm(dim=1))
        return dense_output(sae, ctx.target(x_BD), f_BS, {"sparsity": ctx.sparsity_coefficient * l1})

    def inference_state(self, sae):
        """m 1[m > max(-b, 0)] is SAELens' JumpReLU ReLU(z) 1[z > theta] with no encoder bias (z = m) and
        theta = max(-b, 0)."""
        b = sae.b_enc.detach()
        return "jumprelu", {"b_enc": torch.zeros_like(b), "threshold": (-b).clamp_min(0)}
