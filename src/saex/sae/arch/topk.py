"""TopK (Gao et al. 2024) and BatchTopK (Bussmann et al. 2024), with AuxK, Multi-TopK and Matryoshka."""

from __future__ import annotations

import torch

from saex.sae.arch.base import Architecture, TrainContext, TrainOutput, sum_sq
from saex.sae.arch.matryoshka import matryoshka_loss
from saex.sae.code import Bags, Code
from saex.sae.kernels import decode, sparse_encode
from saex.sae.kernels.encode import topk_code
from saex.sae.kernels.precision import select_dtype


class TopK(Architecture):
    saelens_name = "topk"

    def select(self, z_BS: torch.Tensor, k: int) -> Code:
        return topk_code(z_BS, k)

    def encode(self, sae, x_BD) -> Code:
        return self.select(sae.pre_acts(x_BD), self.cfg.k)

    def kept(self, z_BS: torch.Tensor) -> Bags:
        """The training selection: the kept latents' activations, one bag per row."""
        return self.select(z_BS, self.cfg.k).bags()

    def uses_sparse_kernel(self, ctx: TrainContext) -> bool:
        """The sparse kernel serves every step but AuxK on dead latents and Multi-TopK, which need all of z."""
        return self.cfg.encoder_kernel == "sparse" and not self.cfg.multi_topk and not self.auxk_active(ctx)

    def auxk_active(self, ctx: TrainContext) -> bool:
        return self.cfg.aux_k >= 0 and ctx.dead_S is not None and bool(ctx.dead_S.any())

    def train_forward(self, sae, x_BD, ctx: TrainContext) -> TrainOutput:
        if self.uses_sparse_kernel(ctx):
            z_BS = None
            code = sparse_encode(x_BD, sae.W_enc_SD, sae.b_enc, sae.b_dec, self.kept, select_dtype(self.cfg, x_BD))
        else:
            z_BS = sae.pre_acts(x_BD)
            code = self.kept(z_BS)
        x_hat = decode(sae.W_dec, code.values_N, code.indices_N, code.offsets) + sae.b_dec
        losses = {"mse": (matryoshka_loss(sae, x_BD, code, self.cfg, ctx) if self.cfg.matryoshka != "none"
                          else sum_sq(x_BD, x_hat))}
        if self.cfg.multi_topk:
            losses["multi_topk"] = sum_sq(x_BD, sae.decode(self.select(z_BS, min(4 * self.cfg.k, sae.d_sae)))) / 8
        if self.auxk_active(ctx):
            losses["auxk"] = self.cfg.aux_coefficient * auxk_loss(sae, x_BD, x_hat, z_BS, ctx.dead_S, self.cfg)
        return TrainOutput(x_hat, losses, code.fired(), code.l0().mean())


class BatchTopK(TopK):
    """Keeps the top k*B activations of the whole batch; infers with one global threshold (a JumpReLU)."""

    saelens_name = "jumprelu"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(()))

    def kept(self, z_BS: torch.Tensor) -> Bags:
        """The top k*B of ReLU(z) over the batch: rows keep different counts, each row one bag."""
        B, S = z_BS.shape
        flat, values = top_n(torch.relu(z_BS).flatten(), min(self.cfg.k * B, B * S))
        if self.training and values.numel():
            m = torch.where(self.threshold > 0, self.cfg.batchtopk_momentum, 1.0)  # the first step sets it
            self.threshold.mul_(1 - m).add_(m * values.min().detach().float())
        flat, order = flat.sort()  # row-major: sorted flat indices come grouped by row
        offsets = torch.searchsorted(flat, torch.arange(B + 1, device=flat.device) * S)
        return Bags(values[order], flat % S, offsets, S)

    def encode(self, sae, x_BD) -> Code:
        z = sae.pre_acts(x_BD)
        return Code.from_dense(z * (z > self.threshold))

    def inference_state(self, sae):
        return "jumprelu", {"threshold": self.threshold.expand(sae.d_sae).clone()}


def top_n(f_N: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, values) of the n largest entries of a non-negative flat tensor, leaving out zeros.

    One top-k over millions of entries runs on one thread (78 ms for 32,768 of 6.3 M on the CPU here);
    instead a threshold from a strided sample keeps about 1.25 n candidates, and the result is exact
    whenever at least n pass it (the n-th largest then passes too); otherwise, one full top-k."""
    if n == 0 or f_N.numel() == 0:
        return f_N.new_zeros(0, dtype=torch.int64), f_N.new_zeros(0)
    # a prime stride that does not divide the entry count, so not the row length either: the sample
    # visits every latent
    stride = next(p for p in (61, 59, 53, 47, 43, 41, 37, 31) if f_N.numel() % p)
    sample = f_N[::stride]
    t0 = sample.topk(min(sample.numel(), int(1.25 * n / stride) + 1), sorted=False).values.min()
    candidates = (f_N > t0.clamp_min(0)).nonzero().squeeze(1)
    if t0 > 0 and candidates.numel() < n:
        values, candidates = f_N.topk(n, sorted=False)
    else:
        values = f_N[candidates]
        if candidates.numel() > n:
            values, j = values.topk(n, sorted=False)
            candidates = candidates[j]
    positive = values > 0
    return candidates[positive], values[positive]


def auxk_loss(sae, x_BD, x_hat_BD, z_BS, dead_S, cfg) -> torch.Tensor:
    """Dead latents reconstruct the residual: ||e - W_dec TopK_aux(z_dead)||^2 / Var(e)."""
    e = (x_BD - x_hat_BD).detach()
    k_aux = min(cfg.aux_k or sae.d_in // 2, int(dead_S.sum()))
    values, indices = z_BS.masked_fill(~dead_S, float("-inf")).topk(k_aux, dim=-1, sorted=False)
    e_hat = sae.decode(Code(torch.relu(values), indices, sae.d_sae), bias=False)
    return sum_sq(e, e_hat) / (e - e.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
