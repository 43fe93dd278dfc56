"""Toy data with known ground truth (seed 003, 004): sparse combinations of random unit directions."""

import torch

from saex.store import StoreWriter


def toy_activations(n_rows: int, d: int, n_features: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n_features, d, generator=g)
    features /= features.norm(dim=1, keepdim=True)
    active = torch.rand(n_rows, n_features, generator=g).argsort(dim=1)[:, :k]  # exactly k features per row
    magnitudes = torch.rand(n_rows, k, generator=g) + 0.5
    codes = torch.zeros(n_rows, n_features).scatter_(1, active, magnitudes)
    return codes @ features, features


def write_store(folder, x: torch.Tensor, shard_rows: int = 4096) -> None:
    w = StoreWriter(folder, {"model": "toy", "hooks": ["blocks.0.hook_resid_post"], "tokens": "all",
                             "examples_planned": len(x), "order": "dataset", "seed": 0,
                             "dataset": {"kind": "toy"}, "label_names": None}, shard_rows=shard_rows)
    for start in range(0, len(x), 1024):
        chunk = x[start:start + 1024]
        w.add({"acts.blocks.0.hook_resid_post": chunk.to(torch.bfloat16), "example": torch.arange(len(chunk))},
              [str(i) for i in range(start, start + len(chunk))])
    w.finish()


def mmcs(true_FD: torch.Tensor, learned_SD: torch.Tensor) -> float:
    """Mean over true features of the max cosine similarity with a learned decoder row."""
    t = true_FD / true_FD.norm(dim=1, keepdim=True)
    w = learned_SD / learned_SD.norm(dim=1, keepdim=True)
    return float((t @ w.T).max(dim=1).values.mean())
