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
    for batch in store.iter_ordered([column, "example"], chunk):
        cos_QN = q @ F.normalize(batch[column].float(), dim=-1).T
        top = cos_QN.topk(min(4 * k + len(exclude), cos_QN.shape[1]), dim=1)
        for i, (vals, rows) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
            for v, r in zip(vals, rows):
                ex = int(batch["example"][r])
                if ex not in exclude and v > best[i].get(ex, -2.0):
                    best[i][ex] = v
    return [[{"example": ex, "cosine": c} for ex, c in sorted(b.items(), key=lambda t: -t[1])[:k]] for b in best]
