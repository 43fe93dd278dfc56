"""ReLU + L1: Towards Monosemanticity (classic) and Anthropic's April 2024 update."""

from __future__ import annotations

import torch

from saex.sae.arch.base import (RoutedByDensity, TrainContext, TrainOutput, dense_output, project_decoder_grad,
                                 renormalize_decoder, sum_sq, weighted_l1)
from saex.sae.code import Code
from saex.sae.kernels import decode, sparse_encode
from saex.sae.kernels.encode import positive_code
from saex.sae.kernels.precision import select_dtype


class ReLU(RoutedByDensity):
    """Dense autograd while codes are dense (early on, about half the latents fire); the sparse kernels once
    the L1 has made them sparse (saex.sae.arch.base.RoutedByDensity)."""

    saelens_name = "standard"
    # on 2 CPU cores at 6,144 latents, bf16 autocast: sparse 44 ms against 100 dense at L0 32, 60 against
    # 96 at L0 128, 114 against 101 at L0 256
    sparse_max_density = 1 / 32

    def encode(self, sae, x_BD) -> Code:
        return Code.from_dense(torch.relu(sae.pre_acts(x_BD)))

    def sparse_serves(self, ctx: TrainContext) -> bool:
        return not (self.cfg.ghost_grads and ctx.dead_count() > 0)  # ghost grads read every dead latent's z

    def sparse_forward(self, sae, x_BD, ctx: TrainContext):
        code = sparse_encode(x_BD, sae.W_enc_SD, sae.b_enc, sae.b_in, positive_code, select_dtype(self.cfg, x_BD))
        x_hat = decode(sae.W_dec, code.values_N, code.indices_N, code.offsets) + sae.b_dec
        weights = sae.W_dec.norm(dim=1)[code.indices_N] if self.cfg.l1_variant == "april" else 1.0
        l1 = (code.values_N * weights).sum() / len(x_BD)
        losses = {"mse": sum_sq(ctx.target(x_BD), x_hat), "sparsity": ctx.sparsity_coefficient * l1}
        return TrainOutput(x_hat, losses, code.fired(), code.offsets[-1].float() / len(x_BD))

    def dense_forward(self, sae, x_BD, ctx: TrainContext):
        z_BS = sae.pre_acts(x_BD)
        f_BS = torch.relu(z_BS)
        if self.cfg.l1_variant == "april":  # L1 weighted by decoder row norms; norms are free
            l1 = weighted_l1(f_BS, sae.W_dec.norm(dim=1))
        else:  # decoder rows are kept at unit norm, so a plain L1
            l1 = f_BS.sum(-1).mean()
        out = dense_output(sae, ctx.target(x_BD), f_BS, {"sparsity": ctx.sparsity_coefficient * l1})
        if self.cfg.ghost_grads and ctx.dead_count() > 0:
            out.losses["ghost"] = ghost_grads_loss(sae, ctx.target(x_BD), out.x_hat_BD, z_BS, ctx.dead_S, out.losses["mse"])
        return out

    def before_optimizer_step(self, sae) -> None:
        if self.cfg.l1_variant == "classic":
            project_decoder_grad(sae)

    def after_optimizer_step(self, sae) -> None:
        if self.cfg.l1_variant == "classic":
            renormalize_decoder(sae)


def ghost_grads_loss(sae, x_BD, x_hat_BD, z_BS, dead_S, mse) -> torch.Tensor:
    """Dead latents, activated by exp, learn to reconstruct the residual, scaled to its norm (seed 002);
    0 when none is dead any more (the host's count of the dead may lag)."""
    residual = (x_BD - x_hat_BD).detach()
    ghost = torch.exp(z_BS[:, dead_S]) @ sae.W_dec[dead_S]
    scale = residual.norm(dim=-1, keepdim=True) / (2 * ghost.norm(dim=-1, keepdim=True) + 1e-6)
    ghost_mse = sum_sq(residual, ghost * scale.detach())
    return (mse / (ghost_mse + 1e-6)).detach() * ghost_mse * dead_S.any()
