"""TopK (Gao et al. 2024) and BatchTopK (Bussmann et al. 2024), with AuxK, Multi-TopK and Matryoshka."""

from __future__ import annotations

import torch

from saex.sae.arch.base import Architecture, TrainContext, TrainOutput, sum_sq
from saex.sae.arch.matryoshka import matryoshka_loss
from saex.sae.code import Bags, Code, join_rows
from saex.sae.kernels import decode, sparse_encode
from saex.sae.kernels.dispatch import ranking_keys
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

    def uses_sparse_kernel(self) -> bool:
        """The sparse kernel serves every step but Multi-TopK's, which needs all of z."""
        return self.cfg.encoder_kernel == "sparse" and not self.cfg.multi_topk

    def aux_count(self, sae, ctx: TrainContext) -> int:
        """AuxK's k this step: 0 without dead latents (on the host's count: no sync here)."""
        return min(self.cfg.aux_k or sae.d_in // 2, ctx.dead_count(), sae.d_sae) if self.cfg.aux_k >= 0 else 0

    def train_forward(self, sae, x_BD, ctx: TrainContext) -> TrainOutput:
        k_aux = self.aux_count(sae, ctx)
        aux = None
        if self.uses_sparse_kernel():
            z_BS = None
            if k_aux:  # the dead latents' top k_aux ride along in the same sparse encode
                code, aux = self._sparse_with_aux(sae, x_BD, ctx.dead_S, k_aux)
            else:
                code = sparse_encode(x_BD, sae.W_enc_SD, sae.b_enc, sae.b_in, self.kept,
                                     select_dtype(self.cfg, x_BD))
        else:
            z_BS = sae.pre_acts(x_BD)
            code = self.kept(z_BS)
            aux = aux_code(z_BS, ctx.dead_S, k_aux).bags() if k_aux else None
        x_hat = decode(sae.W_dec, code.values_N, code.indices_N, code.offsets) + sae.b_dec
        losses = {"mse": (matryoshka_loss(sae, ctx.target(x_BD), code, self.cfg, ctx) if self.cfg.matryoshka != "none"
                          else sum_sq(ctx.target(x_BD), x_hat))}
        if self.cfg.multi_topk:
            losses["multi_topk"] = sum_sq(ctx.target(x_BD), sae.decode(self.select(z_BS, min(4 * self.cfg.k, sae.d_sae)))) / 8
        if aux is not None:
            losses["auxk"] = self.cfg.aux_coefficient * auxk_loss(sae, ctx.target(x_BD), x_hat, aux, ctx.dead_S)
        return TrainOutput(x_hat, losses, code.fired(), code.l0().mean())

    def _sparse_with_aux(self, sae, x_BD, dead_S, k_aux: int) -> tuple[Bags, Bags]:
        """The kept code and AuxK's (each row's k_aux largest dead latents) from one sparse encode: both
        sets of entries in one bag per row, so that the encoder's backward takes both gradients at once."""
        parts = {}

        def select(z_BS):
            kept, aux = self.kept(z_BS), aux_code(z_BS, dead_S, k_aux).bags()
            joined, parts["kept"], parts["aux"] = join_rows(kept, aux)
            parts["offsets"] = kept.offsets, aux.offsets
            return joined

        code = sparse_encode(x_BD, sae.W_enc_SD, sae.b_enc, sae.b_in, select, select_dtype(self.cfg, x_BD))
        return tuple(Bags(code.values_N[parts[name]], code.indices_N[parts[name]], offsets, sae.d_sae)
                     for name, offsets in zip(("kept", "aux"), parts["offsets"]))


class BatchTopK(TopK):
    """Keeps the top k*B activations of the whole batch; infers with one global threshold (a JumpReLU)."""

    saelens_name = "jumprelu"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(()))

    def kept(self, z_BS: torch.Tensor) -> Bags:
        """The top k*B of ReLU(z) over the batch: rows keep different counts, each row one bag."""
        B, S = z_BS.shape
        flat, values = top_n(z_BS.flatten(), min(self.cfg.k * B, B * S))
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


def top_n(z_N: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, values) of the n largest entries of ReLU(z) over a flat tensor, leaving out zeros.

    One top-k over millions of entries runs on one thread (78 ms for 32,768 of 6.3 M on the CPU here);
    instead a threshold from a strided sample keeps about 1.25 n candidates, and the result is exact
    whenever at least n pass it (the n-th largest then passes too); otherwise, one full top-k. The
    comparisons run on `ranking_keys` (on CPUs, integers: no ReLU pass and no NaN tests)."""
    if n == 0 or z_N.numel() == 0:
        return z_N.new_zeros(0, dtype=torch.int64), z_N.new_zeros(0)
    keys = ranking_keys(z_N)
    # a prime stride that does not divide the entry count, so not the row length either: the sample
    # visits every latent
    stride = next(p for p in (61, 59, 53, 47, 43, 41, 37, 31) if z_N.numel() % p)
    sample = keys[::stride]
    t0 = sample.topk(min(sample.numel(), int(1.25 * n / stride) + 1), sorted=False).values.min()
    candidates = (keys > t0.clamp_min(0)).nonzero().squeeze(1)
    if t0 > 0 and candidates.numel() < n:
        candidates = keys.topk(n, sorted=False).indices
    elif candidates.numel() > n:
        candidates = candidates[keys[candidates].topk(n, sorted=False).indices]
    values = z_N[candidates]
    positive = values > 0
    return candidates[positive], values[positive]


def aux_code(z_BS: torch.Tensor, dead_S: torch.Tensor, k_aux: int) -> Code:
    """Each row's k_aux largest dead latents, ReLU'd (live latents have z = -inf here: one that pads a row
    with fewer than k_aux positive dead latents keeps 0, and so adds nothing and gets no gradient)."""
    return topk_code(z_BS.masked_fill(~dead_S, float("-inf")), k_aux)


def auxk_loss(sae, x_BD, x_hat_BD, aux: Bags, dead_S) -> torch.Tensor:
    """Dead latents reconstruct the residual: ||e - W_dec TopK_aux(z_dead)||^2 / Var(e); 0 when no latent
    is dead any more (the host's count may lag)."""
    e = (x_BD - x_hat_BD).detach()
    e_hat = decode(sae.W_dec, aux.values_N, aux.indices_N, aux.offsets)
    return sum_sq(e, e_hat) / (e - e.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12) * dead_S.any()
