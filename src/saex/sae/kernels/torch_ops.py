"""The torch path of the sparse primitives (any device): embedding bags and a sparse product.

On 2 CPU cores at B 1,024, K 32, D 384, S 6,144 these beat every other formulation we timed: the
embedding bag's forward (0.6 ms) and backward, and a COO sparse product for the weight gradient
(4.3 ms, against 8.3 ms as CSR and 24 ms as an index_add of materialised outer products).
Entries are flat ([N]) and grouped in bags by offsets ([M + 1]) or labelled with their row ([N])."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def decode(W_SD: torch.Tensor, values_N: torch.Tensor, indices_N: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """out[m] = sum of values[e] W[indices[e]] over bag m's entries, differentiable through torch's own
    embedding-bag backward  -> [M, D]."""
    return F.embedding_bag(indices_N, W_SD, offsets, mode="sum", per_sample_weights=values_N.to(W_SD.dtype),
                           include_last_offset=True)


def scatter_rows(X_BD: torch.Tensor, values_N: torch.Tensor, indices_N: torch.Tensor, rows_N: torch.Tensor,
                 S: int) -> tuple[torch.Tensor, torch.Tensor]:
    """out[s] = sum over the entries e with indices[e] = s of values[e] X[rows[e]]  -> [S, D], float32 or
    wider (as the Triton path; CUDA's sparse product has no bfloat16), and each latent's sum of values -> [S]."""
    X_BD = X_BD.to(torch.promote_types(X_BD.dtype, torch.float32))
    values_N = values_N.to(X_BD.dtype)
    G_SB = torch.sparse_coo_tensor(torch.stack([indices_N, rows_N]), values_N, (S, X_BD.shape[0]),
                                   check_invariants=False)
    with torch.autocast(X_BD.device.type, enabled=False):  # a backward under autocast would cast it down
        out = torch.sparse.mm(G_SB, X_BD)
    return out, torch.zeros(S, dtype=X_BD.dtype, device=X_BD.device).index_add_(0, indices_N, values_N)


def entry_dots(G_MD: torch.Tensor, W_SD: torch.Tensor, indices_N: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """<G[m], W[indices[e]]> for each entry e of bag m  -> [N]: the embedding bag's gradient in its
    per-entry weights (2.7 ms for 32,768 entries of 384 here, against 31 ms for a gathered product)."""
    with torch.enable_grad():
        weights = torch.zeros(indices_N.shape, dtype=W_SD.dtype, device=W_SD.device, requires_grad=True)
        out = F.embedding_bag(indices_N, W_SD.detach(), offsets, mode="sum", per_sample_weights=weights,
                              include_last_offset=True)
        return torch.autograd.grad(out, weights, G_MD.to(W_SD.dtype))[0]
