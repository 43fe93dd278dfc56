"""Data-dependent initialisation: the decoder bias and the input scale."""

from __future__ import annotations

import torch


def geometric_median(x_ND: torch.Tensor, iters: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to the rows."""
    x = x_ND.double()
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-12)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() <= tol * y.norm().clamp_min(1e-12):
            y = y_new
            break
        y = y_new
    return y.to(x_ND.dtype)


def decoder_bias(x_ND: torch.Tensor, how: str) -> torch.Tensor:
    if how == "geometric_median":
        return geometric_median(x_ND)
    if how == "mean":
        return x_ND.mean(0)
    if how == "zero":
        return torch.zeros(x_ND.shape[1], dtype=x_ND.dtype)
    raise ValueError(f"b_dec init {how!r} is not one of ['geometric_median', 'mean', 'zero']")


def input_scale(x_ND: torch.Tensor) -> float:
    """s such that E||s x|| = sqrt(d) (Anthropic's April 2024 update)."""
    return float(x_ND.shape[1] ** 0.5 / x_ND.float().norm(dim=1).mean().clamp_min(1e-12))
