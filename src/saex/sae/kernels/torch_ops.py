"""The torch path of the sparse primitives (any device): embedding bags and a sparse product.

On 2 CPU cores at B 1,024, K 32, D 384, S 6,144 these beat every other formulation we timed: the
embedding bag's forward (0.6 ms) and backward, and a COO sparse product for the weight gradient
(4.3 ms, against 8.3 ms as CSR and 24 ms as an index_add of materialised outer products)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def decode(W_SD: torch.Tensor, values_BK: torch.Tensor, indices_BK: torch.Tensor) -> torch.Tensor:
    """sum_j values[b, j] W[indices[b, j]], differentiable through torch's own embedding-bag backward."""
    return F.embedding_bag(indices_BK, W_SD, per_sample_weights=values_BK.to(W_SD.dtype), mode="sum")


def scatter_rows(X_BD: torch.Tensor, values_BK: torch.Tensor, indices_BK: torch.Tensor, S: int) -> torch.Tensor:
    """out[s] = sum over (b, j) with indices[b, j] = s of values[b, j] X[b]  -> [S, D]."""
    B, K = indices_BK.shape
    rows = torch.arange(B, device=X_BD.device).repeat_interleave(K)
    G_SB = torch.sparse_coo_tensor(torch.stack([indices_BK.reshape(-1), rows]), values_BK.reshape(-1).to(X_BD.dtype),
                                   (S, B), check_invariants=False)
    return torch.sparse.mm(G_SB, X_BD)

