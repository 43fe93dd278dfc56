"""Matryoshka losses (seed 004): every nested prefix of the latents must reconstruct the input alone."""

from __future__ import annotations

import torch

from saex.sae.arch.base import TrainContext
from saex.sae.code import Bags
from saex.sae.kernels import decode


def prefix_ends(cfg, d_sae: int, ctx: TrainContext) -> list[int]:
    """Exclusive ends M_1 < ... < M_G = d_sae of the nested prefixes."""
    if cfg.matryoshka == "fixed":
        ends = torch.tensor(cfg.matryoshka_groups).cumsum(0).mul(d_sae).round().long().tolist()
    else:  # random prefix lengths each step
        ends = torch.randint(1, d_sae, (cfg.matryoshka_prefixes,), generator=ctx.generator).tolist()
    return sorted({max(1, min(e, d_sae)) for e in ends} | {d_sae})


def matryoshka_loss(sae, x_BD: torch.Tensor, code: Bags, cfg, ctx: TrainContext) -> torch.Tensor:
    """Mean over prefixes of the reconstruction error using only the latents before each end.

    One decode serves every prefix: the code's entries are regrouped, without padding, into one bag per
    (row, group of latents between two ends), and the prefixes' reconstructions are running sums of the
    bags'. The smallest prefix gets gradient from every loss, which seed 004 found to matter."""
    ends = torch.tensor(prefix_ends(cfg, sae.d_sae, ctx), device=x_BD.device)
    B, G = x_BD.shape[0], len(ends)
    group_N = torch.bucketize(code.indices_N, ends, right=True)  # the group each kept latent falls in
    bag_N, order = (code.rows() * G + group_N).sort()  # one bag per (row, group)
    offsets = torch.searchsorted(bag_N, torch.arange(B * G + 1, device=x_BD.device))
    partial_BGD = decode(sae.W_dec, code.values_N[order], code.indices_N[order], offsets).view(B, G, -1)
    prefix_BGD = partial_BGD.cumsum(1) + sae.b_dec
    return (x_BD[:, None, :] - prefix_BGD).pow(2).sum(-1).mean()
