"""The dataset examples nearest to an activation: how a user sees an edit without an image generator."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from saex.store import ActivationStore


@torch.no_grad()
def nearest_examples(store: ActivationStore, column: str, queries_QD: torch.Tensor, k: int = 8,
                     exclude: set[int] | frozenset = frozenset(), chunk: int = 65536) -> list[list[dict]]:
    """For each query, the `k` examples (dataset indices) whose stored rows at the hook point have the
    highest cosine to it, best first; an example counts once (its best row) and `exclude` never."""
    q = F.normalize(queries_QD.float(), dim=-1)
    best: list[dict[int, float]] = [{} for _ in range(len(q))]
    excluded = torch.tensor(sorted(exclude), dtype=torch.long)
    for batch in store.iter_ordered([column, "example"], chunk):
        cos_QN = q @ F.normalize(batch[column].float(), dim=-1).T
        examples_E, row_example_N = torch.unique(batch["example"], return_inverse=True)
        # each example's best row first (a token store holds many rows per example), then the top k examples
        cos_QE = torch.full((len(q), len(examples_E)), -2.0).scatter_reduce(
            1, row_example_N.expand(len(q), -1), cos_QN, "amax")
        cos_QE[:, torch.isin(examples_E, excluded)] = -2.0
        top = cos_QE.topk(min(k, len(examples_E)), dim=1)
        for i, (vals, cols) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
            for v, c in zip(vals, cols):
                ex = int(examples_E[c])
                if v > -2.0 and v > best[i].get(ex, -2.0):
                    best[i][ex] = v
    return [[{"example": ex, "cosine": c} for ex, c in sorted(b.items(), key=lambda t: -t[1])[:k]] for b in best]
