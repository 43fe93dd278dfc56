"""ReLU + L1: Towards Monosemanticity (classic) and Anthropic's April 2024 update."""

from __future__ import annotations

import torch

from saex.sae.arch.base import (Architecture, TrainContext, dense_output, project_decoder_grad,
                                 renormalize_decoder, sum_sq)
from saex.sae.code import Code


class ReLU(Architecture):
    saelens_name = "standard"

    def encode(self, sae, x_BD) -> Code:
        return Code.from_dense(torch.relu(sae.pre_acts(x_BD)))

    def train_forward(self, sae, x_BD, ctx: TrainContext):
        z_BS = sae.pre_acts(x_BD)
        f_BS = torch.relu(z_BS)
        if self.cfg.l1_variant == "april":  # L1 weighted by decoder row norms; norms are free
            l1 = (f_BS * sae.W_dec.norm(dim=1)).sum(-1).mean()
        else:  # decoder rows are kept at unit norm, so a plain L1
            l1 = f_BS.sum(-1).mean()
        out = dense_output(sae, x_BD, f_BS, {"sparsity": ctx.sparsity_coefficient * l1})
        if self.cfg.ghost_grads and ctx.dead_count() > 0:
            out.losses["ghost"] = ghost_grads_loss(sae, x_BD, out.x_hat_BD, z_BS, ctx.dead_S, out.losses["mse"])
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
