"""Neuron alignment (seed 002): how close each feature's encoder vector is to an MLP neuron's output
vector, against the same measure for random vectors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def max_cosine(vectors_SD: torch.Tensor, neurons_ND: torch.Tensor, chunk: int = 4096):
    """Max cosine similarity of each vector with any neuron, and which neuron, chunked for memory."""
    neurons = F.normalize(neurons_ND.float(), dim=1)
    best, arg = [], []
    for start in range(0, len(vectors_SD), chunk):
        cos = F.normalize(vectors_SD[start:start + chunk].float(), dim=1) @ neurons.T
        b, a = cos.max(dim=1)
        best.append(b)
        arg.append(a)
    return torch.cat(best), torch.cat(arg)


def neuron_alignment(encoder_DS: torch.Tensor, neurons_ND: torch.Tensor, seed: int = 0) -> dict:
    """Per feature: max cosine with an MLP-out vector, the best neuron, and how many neurons exceed the
    largest max cosine reached by as many random Gaussian vectors (the random range)."""
    vectors = encoder_DS.T.float()
    best, arg = max_cosine(vectors, neurons_ND)
    g = torch.Generator().manual_seed(seed)
    random_best, _ = max_cosine(torch.randn(vectors.shape, generator=g), neurons_ND)
    lo, hi = float(random_best.min()), float(random_best.max())
    neurons = F.normalize(neurons_ND.float(), dim=1)
    above = torch.cat([(F.normalize(vectors[s:s + 4096], dim=1) @ neurons.T > hi).sum(1)
                       for s in range(0, len(vectors), 4096)])
    return {"max_cos": best, "neuron": arg, "n_above_random": above, "random_range": (lo, hi)}
