"""Gated SAE (Rajamanoharan et al. 2024): a gate decides which latents fire, a magnitude path how much.

pi_gate = W(x - b_dec) + b_gate and pi_mag = exp(r_mag) * W(x - b_dec) + b_mag share W = W_enc;
b_enc plays b_gate. As in the paper, decoder rows keep unit norm and the gate's L1 is plain: an L1
weighted by free decoder norms lets the decoder shrink while the unpenalised magnitude path
cannot follow, and reconstruction collapses."""

from __future__ import annotations

import torch
from torch import nn

from saex.sae.arch.base import (Architecture, TrainContext, dense_output, project_decoder_grad,
                                 renormalize_decoder, sum_sq)
from saex.sae.code import Code


class Gated(Architecture):
    saelens_name = "gated"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae))

    def _paths(self, sae, x_BD):
        wx = sae.pre_acts(x_BD, bias=False)
        # in the product's precision (bfloat16 under autocast): float32 biases would promote both [B, S]
        # paths, and every product after them would cast back
        return (wx + sae.b_enc.to(wx.dtype),
                torch.addcmul(self.b_mag.to(wx.dtype), torch.exp(self.r_mag).to(wx.dtype), wx))

    def encode(self, sae, x_BD) -> Code:
        gate, mag = self._paths(sae, x_BD)
        return Code.from_dense((gate > 0) * torch.relu(mag))

    def train_forward(self, sae, x_BD, ctx: TrainContext):
        gate, mag = self._paths(sae, x_BD)
        f_BS = (gate > 0) * torch.relu(mag)
        gate_acts = torch.relu(gate)
        sparsity = gate_acts.sum(-1).mean()
        aux = sum_sq(x_BD, gate_acts @ sae.W_dec.detach() + sae.b_dec.detach())
        return dense_output(sae, x_BD, f_BS, {"sparsity": ctx.sparsity_coefficient * sparsity, "gate_aux": aux})

    def before_optimizer_step(self, sae) -> None:
        project_decoder_grad(sae)

    def after_optimizer_step(self, sae) -> None:
        renormalize_decoder(sae)

    def inference_state(self, sae):
        return "gated", {"b_gate": sae.b_enc.detach().clone(), "r_mag": self.r_mag.detach().clone(),
                         "b_mag": self.b_mag.detach().clone()}
