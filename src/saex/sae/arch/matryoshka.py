"""Matryoshka losses (seed 004): every nested prefix of the latents must reconstruct the input alone."""

from __future__ import annotations

import torch

from saex.sae.arch.base import TrainContext, sum_sq
from saex.sae.code import Code


def prefix_ends(cfg, d_sae: int, ctx: TrainContext) -> list[int]:
    """Exclusive ends M_1 < ... < M_G = d_sae of the nested prefixes."""
    if cfg.matryoshka == "fixed":
        ends = torch.tensor(cfg.matryoshka_groups).cumsum(0).mul(d_sae).round().long().tolist()
    else:  # random prefix lengths each step
        ends = torch.randint(1, d_sae, (cfg.matryoshka_prefixes,), generator=ctx.generator).tolist()
    return sorted({max(1, min(e, d_sae)) for e in ends} | {d_sae})


def matryoshka_loss(sae, x_BD: torch.Tensor, code: Code, cfg, ctx: TrainContext) -> torch.Tensor:
    """Mean over prefixes of the reconstruction error using only the latents before each end.

    The smallest prefix gets gradient from every loss, which seed 004 found to matter."""
    losses = [sum_sq(x_BD, sae.decode(Code(code.values_BK * (code.indices_BK < end), code.indices_BK, code.d_sae)))
              for end in prefix_ends(cfg, sae.d_sae, ctx)]
    return torch.stack(losses).mean()
