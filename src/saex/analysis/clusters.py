"""The ultra-low-density cluster of seed 002: a band of features with small activations that fire
rarely and at random, whose encoder vectors point the same way (they act as one feature)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def otsu_threshold(values: np.ndarray, bins: int = 64) -> float:
    """The cut that maximises the between-class variance of a 1-D sample (Otsu, 1979)."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = (np.sum(hist * centres) - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(edges[1:][np.argmax(between)])


def mean_pairwise_cosine(vectors_ND: torch.Tensor, max_n: int = 2048, seed: int = 0) -> float:
    """Mean cosine similarity over distinct pairs (a random subset of at most `max_n` vectors)."""
    n = len(vectors_ND)
    if n < 2:
        return float("nan")
    if n > max_n:
        vectors_ND = vectors_ND[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_n]]
        n = max_n
    v = F.normalize(vectors_ND.float(), dim=1)
    total = (v @ v.T).sum() - n
    return float(total / (n * (n - 1)))


MIN_COSINE = 0.3  # a lower band whose encoder vectors agree less than this is no cluster


def low_density_cluster(log10_mean_act: np.ndarray, live: np.ndarray, encoder_DS: torch.Tensor) -> dict:
    """Members: live features below the Otsu cut of log10 mean top activation (the lower band of seed
    002's scatter), provided their encoder vectors point the same way (mean pairwise cosine >=
    MIN_COSINE; otherwise the band is just the weaker half of ordinary features and nobody is a member).
    Reports the cut and the mean encoder cosine inside and outside the band."""
    member = np.zeros(len(live), dtype=bool)
    if live.sum() < 2:
        return {"member": member, "threshold": float("nan"), "mean_cos_in": float("nan"), "mean_cos_out": float("nan")}
    cut = otsu_threshold(log10_mean_act[live])
    member[live] = log10_mean_act[live] < cut
    vectors = encoder_DS.T
    cos_in = mean_pairwise_cosine(vectors[torch.from_numpy(member)])
    cos_out = mean_pairwise_cosine(vectors[torch.from_numpy(live & ~member)])
    if not cos_in >= MIN_COSINE:
        member[:] = False
    return {"member": member, "threshold": cut, "mean_cos_in": cos_in, "mean_cos_out": cos_out}
