"""Sparse codes in top-k form: every architecture's encode returns one."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Code:
    values_BK: torch.Tensor  # activations of the kept latents (zeros pad rows with fewer)
    indices_BK: torch.Tensor  # their latent indices, int64
    d_sae: int

    @staticmethod
    def from_dense(f_BS: torch.Tensor) -> "Code":
        k = max(int((f_BS != 0).sum(-1).max()) if f_BS.numel() else 0, 1)
        values, indices = f_BS.topk(k, dim=-1, sorted=False)
        return Code(values, indices, f_BS.shape[-1])

    @staticmethod
    def rows_from_flat(flat_N: torch.Tensor, B: int, S: int, *columns_N: torch.Tensor):
        """Entries given by sorted flat indices into a [B, S] matrix, laid out as rows padded to the fullest
        row's count: (latent indices [B, W], then each column [B, W], zero in the padding)."""
        rows = flat_N // S
        counts = torch.bincount(rows, minlength=B)
        slot = torch.arange(flat_N.numel(), device=flat_N.device) - (counts.cumsum(0) - counts)[rows]
        width = max(int(counts.max()) if B else 0, 1)
        # padding slots point at distinct latents (with zero values): a run of one repeated index would
        # serialise the embedding bag's weight gradient on that row
        spread = torch.arange(width, device=flat_N.device).remainder(S).expand(B, width).clone()
        out = []
        for col, padded in zip((flat_N % S, *columns_N),
                               (spread, *(torch.zeros(B, width, dtype=c.dtype, device=c.device) for c in columns_N))):
            padded[rows, slot] = col
            out.append(padded)
        return out

    def dense(self) -> torch.Tensor:
        out = torch.zeros(*self.values_BK.shape[:-1], self.d_sae, dtype=self.values_BK.dtype,
                          device=self.values_BK.device)
        return out.scatter_(-1, self.indices_BK, self.values_BK)

    def l0(self) -> torch.Tensor:
        """Active latents per row."""
        return (self.values_BK != 0).sum(-1)

    def fired(self) -> torch.Tensor:
        """bool [d_sae]: which latents are active in some row."""
        return fired_latents(self.indices_BK, self.values_BK, self.d_sae)


def fired_latents(indices: torch.Tensor, values: torch.Tensor, d_sae: int) -> torch.Tensor:
    """bool [d_sae]: the latents with a nonzero value among the entries (a scatter, no host sync)."""
    counts = torch.zeros(d_sae, dtype=torch.int32, device=indices.device)
    return counts.index_add_(0, indices.reshape(-1), (values != 0).to(torch.int32).reshape(-1)) > 0
