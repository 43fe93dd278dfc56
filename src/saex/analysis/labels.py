"""Label distributions of a feature's top examples and their entropy (seed 002)."""

from __future__ import annotations

import torch


def label_distribution(labels_SK: torch.Tensor, weights_SK: torch.Tensor, n_labels: int, top: int = 20) -> torch.Tensor:
    """[S, n_labels]: labels of each latent's `top` best examples, weighted linearly by activation.

    Entries with label -1 (unlabelled) or weight <= 0 (no example) count for nothing; a latent with
    none gets an all-zero row."""
    labels, weights = labels_SK[:, :top], weights_SK[:, :top].clamp_min(0)
    weights = torch.where(labels >= 0, weights, torch.zeros_like(weights))
    dist = torch.zeros(labels.shape[0], n_labels).scatter_add_(1, labels.clamp_min(0), weights)
    total = dist.sum(1, keepdim=True)
    return torch.where(total > 0, dist / total.clamp_min(1e-12), dist)


def entropy_bits(p_SL: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in bits of each row; 0 for an all-zero row."""
    logs = torch.where(p_SL > 0, p_SL.log2(), torch.zeros_like(p_SL))
    return -(p_SL * logs).sum(1)
