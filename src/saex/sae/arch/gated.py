"""Gated SAE (Rajamanoharan et al. 2024): a gate decides which latents fire, a magnitude path how much.

pi_gate = W(x - b_dec) + b_gate and pi_mag = exp(r_mag) * W(x - b_dec) + b_mag share W = W_enc;
b_enc plays b_gate. As in the paper, decoder rows keep unit norm and the gate's L1 is plain: an L1
weighted by free decoder norms lets the decoder shrink while the unpenalised magnitude path
cannot follow, and reconstruction collapses.

Every term of the loss lives on the entries whose gate opens (pi_gate > 0): the code, the gate's L1 and
its auxiliary reconstruction through ReLU(pi_gate), and pi_mag = exp(r_mag) (pi_gate - b_gate) + b_mag
there needs no second product. Once few gates open, a step keeps only those entries, through the
sparse kernels (saex.sae.arch.base.RoutedByDensity, on the gates' count)."""

from __future__ import annotations

import torch
from torch import nn

from saex.sae.arch.base import (RoutedByDensity, TrainContext, TrainOutput, dense_output, project_decoder_grad,
                                 renormalize_decoder, sum_sq)
from saex.sae.code import Bags, Code, active_counts
from saex.sae.kernels import decode, sparse_encode
from saex.sae.kernels.encode import positive_code
from saex.sae.kernels.precision import select_dtype


class Gated(RoutedByDensity):
    saelens_name = "gated"
    sparse_max_density = 1 / 32  # on the open gates' count

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

    def sparse_forward(self, sae, x_BD, ctx: TrainContext) -> TrainOutput:
        gate = sparse_encode(x_BD, sae.W_enc_SD, sae.b_enc, sae.b_in, positive_code, select_dtype(self.cfg, x_BD))
        idx, B = gate.indices_N, len(x_BD)
        mag_N = torch.addcmul(self.b_mag[idx], torch.exp(self.r_mag)[idx], gate.values_N - sae.b_enc[idx])
        code = Bags(torch.relu(mag_N), idx, gate.offsets, sae.d_sae)
        x_hat = decode(sae.W_dec, code.values_N, idx, gate.offsets) + sae.b_dec
        gate_hat = decode(sae.W_dec.detach(), gate.values_N, idx, gate.offsets) + sae.b_dec.detach()
        losses = {"mse": sum_sq(ctx.target(x_BD), x_hat), "sparsity": ctx.sparsity_coefficient * gate.values_N.sum() / B,
                  "gate_aux": sum_sq(ctx.target(x_BD), gate_hat)}
        l0 = active_counts(code.values_N.detach() != 0, 0).float() / B  # NaN counts, as the dense path's
        return TrainOutput(x_hat, losses, code.fired(), l0, {"open_gates": gate.offsets[-1].float() / B})

    def dense_forward(self, sae, x_BD, ctx: TrainContext) -> TrainOutput:
        gate, mag = self._paths(sae, x_BD)
        open_BS = gate > 0
        f_BS = open_BS * torch.relu(mag)
        gate_acts = torch.relu(gate)
        sparsity = gate_acts.sum(-1).mean()
        aux = sum_sq(ctx.target(x_BD), gate_acts @ sae.W_dec.detach() + sae.b_dec.detach())
        open_gates = active_counts(open_BS, -1).float().mean()
        return dense_output(sae, ctx.target(x_BD), f_BS, {"sparsity": ctx.sparsity_coefficient * sparsity, "gate_aux": aux},
                            {"open_gates": open_gates})

    def sparse_entries(self, out: TrainOutput) -> torch.Tensor:
        return out.extras["open_gates"]

    def before_optimizer_step(self, sae) -> None:
        project_decoder_grad(sae)

    def after_optimizer_step(self, sae) -> None:
        renormalize_decoder(sae)

    def inference_state(self, sae):
        return "gated", {"b_gate": sae.b_enc.detach().clone(), "r_mag": self.r_mag.detach().clone(),
                         "b_mag": self.b_mag.detach().clone()}
