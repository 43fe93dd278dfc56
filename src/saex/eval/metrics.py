"""Reconstruction and sparsity metrics, accumulated over batches in float64.

Names (metrics.json): l0 (mean active latents per token), mse (squared error per token, summed over
dimensions), mse_per_dim, fvu (sum ||x - x_hat||^2 / sum ||x - mean x||^2), explained_variance
(1 - fvu), cosine (mean cosine of x and x_hat), dead_frac (never fired), dense_frac (fired on at least
DENSE of tokens), density_hist (log10 density histogram of the live latents), tokens."""

from __future__ import annotations

import numpy as np
import torch

from saex.sae.code import active_counts

DENSE = 0.1
HIST_BINS = np.linspace(-7, 0, 29)


class ReconstructionStats:
    def __init__(self, d_sae: int):
        self.n = 0
        self.sq_err = 0.0
        self.sum_x = None
        self.sum_sq_x = 0.0
        self.cos = 0.0
        self.active = 0.0
        self.d = None
        self.fires_S = torch.zeros(d_sae, dtype=torch.float64)

    @torch.no_grad()
    def update(self, x_BD: torch.Tensor, x_hat_BD: torch.Tensor, f_BS: torch.Tensor) -> None:
        x, x_hat = x_BD.double(), x_hat_BD.double()
        self.n += len(x)
        self.d = x.shape[1]
        self.sq_err += float((x - x_hat).pow(2).sum())
        self.sum_x = x.sum(0) if self.sum_x is None else self.sum_x + x.sum(0)
        self.sum_sq_x += float(x.pow(2).sum())
        self.cos += float(torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).sum())
        fires_S = active_counts(f_BS.bool(), 0)
        self.active += float(fires_S.sum())
        self.fires_S += fires_S.double().cpu()

    def result(self) -> dict:
        if not self.n:
            raise ValueError("no tokens were evaluated")
        total_var = self.sum_sq_x - float(self.sum_x.pow(2).sum()) / self.n  # sum ||x - mean||^2
        density = (self.fires_S / self.n).numpy()
        live = density[density > 0]
        hist, _ = np.histogram(np.log10(live), bins=HIST_BINS)
        fvu = self.sq_err / total_var
        return {
            "tokens": self.n, "l0": self.active / self.n, "mse": self.sq_err / self.n,
            "mse_per_dim": self.sq_err / (self.n * self.d), "fvu": fvu, "explained_variance": 1 - fvu,
            "cosine": self.cos / self.n, "dead_frac": float((density == 0).mean()),
            "dense_frac": float((density >= DENSE).mean()),
            "density_hist": {"log10_bin_edges": HIST_BINS.tolist(), "counts": hist.tolist()},
            "density": density.tolist(),
        }
