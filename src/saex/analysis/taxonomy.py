"""The logit-weight taxonomy of Bloom and Lin ('Understanding SAE Features with the Logit Lens', 2024): the
shape of a feature's logit-weight distribution (its decoder vector read through the model's readout, one weight
per token, class or prompt: analysis/lens.py) sorts it into a class.

- prediction: a heavy positive tail (a few outputs promoted far above the rest);
- suppression: a heavy negative tail (a few outputs pushed far below);
- partition: both tails heavy and neither dominating, or the outputs split into two camps (a strongly bimodal,
  light-tailed distribution: Bloom and Lin's partition features promote about half the vocabulary and suppress
  the other half);
- none: neither (a bell-shaped spread, as a random direction gives).

The statistics are scipy's defaults: skew is the biased sample skewness m3 / m2^1.5 (scipy.stats.skew), kurtosis
the biased *Fisher* (excess) kurtosis m4 / m2^2 - 3 (scipy.stats.kurtosis), 0 for a normal distribution.
Bloom and Lin's code (SAELens' get_stats_df) reports Pearson kurtosis, m4 / m2^2: add 3 to compare.

Bloom and Lin characterise the classes by these statistics but give no numeric cut-offs, so the thresholds are
chosen here from reference shapes:
- a tail is heavy when the excess kurtosis exceeds HEAVY = 3, the Laplace distribution's (heavier than an
  exponential tail); a Gaussian sample's estimate spreads by ~sqrt(24 / n) around 0: 0.02 over 50k tokens,
  1.5 over 10 classes, where it takes one class standing out alone (10 values reach at most 5.1);
- the tail is one-sided when |skew| exceeds SIDED = 1 (a Gaussian bulk with a few outliers on one side reaches
  it as soon as its kurtosis is large; equal tails on both sides give ~0; the exponential distribution has 2);
- the outputs split in two when the excess kurtosis is below SPLIT = -1.5 (a mixture of two unit Gaussians at
  +-2.6 standard deviations: two well separated camps; a uniform spread has -1.2, a 50/50 two-point split -2),
  over at least SPLIT_MIN_OUTPUTS = 20 outputs: Gaussian samples of 10 values fall below -1.5 3 % of the time,
  of 5 values 20 %, of 20 values 0.2 % (20,000 samples each); their kurtosis exceeds 3 at most 0.4 % of the
  time at any size, so the heavy-tail rule needs no such floor.
"""

from __future__ import annotations

import math

import torch

CLASSES = ("prediction", "suppression", "partition", "none")
HEAVY = 3.0
SIDED = 1.0
SPLIT = -1.5
SPLIT_MIN_OUTPUTS = 20


def skew_kurtosis(weights_NV: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Skewness and Fisher (excess) kurtosis of each row, biased (population) moments: scipy.stats.skew(x, axis=1)
    and scipy.stats.kurtosis(x, axis=1). NaN for a row without spread (as scipy, which tests m2 against the
    dtype's resolution times the mean)."""
    if weights_NV.dim() != 2 or weights_NV.shape[1] < 2:
        raise ValueError(f"weights must be [N, V] with V >= 2 outputs, got shape {tuple(weights_NV.shape)}")
    mean = weights_NV.mean(1, keepdim=True)
    dev = weights_NV - mean
    sq = dev * dev
    m2 = sq.mean(1)
    m3 = (sq * dev).mean(1)
    m4 = (sq * sq).mean(1)
    flat = m2 <= (torch.finfo(weights_NV.dtype).resolution * mean.squeeze(1)) ** 2
    nan = torch.full_like(m2, float("nan"))
    skew = torch.where(flat, nan, m3 / m2.clamp_min(torch.finfo(m2.dtype).tiny) ** 1.5)
    kurt = torch.where(flat, nan, m4 / m2.clamp_min(torch.finfo(m2.dtype).tiny) ** 2 - 3.0)
    return skew, kurt


def classify(skew_N: torch.Tensor, kurtosis_N: torch.Tensor, outputs: int | None = None, heavy: float = HEAVY,
             sided: float = SIDED, split: float = SPLIT) -> list[str]:
    """Each feature's class (CLASSES) from its logit weights' skew and excess kurtosis over `outputs` outputs
    (None: many); NaN (no spread): none."""
    if heavy <= 0 or sided <= 0 or split >= 0:
        raise ValueError(f"thresholds must be heavy > 0, sided > 0, split < 0; got {heavy}, {sided}, {split}")
    if outputs is not None and outputs < SPLIT_MIN_OUTPUTS:
        split = -math.inf  # too few outputs to tell two camps from chance
    out = []
    for s, k in zip(skew_N.tolist(), kurtosis_N.tolist()):
        if s != s or k != k:  # NaN
            out.append("none")
        elif k > heavy:
            out.append("prediction" if s > sided else "suppression" if s < -sided else "partition")
        elif k < split and abs(s) <= sided:
            out.append("partition")
        else:
            out.append("none")
    return out
