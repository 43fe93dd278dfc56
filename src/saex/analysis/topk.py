"""Per-latent top-k kept while streaming: the top activating examples of every feature in one pass."""

from __future__ import annotations

import torch


class PerLatentTopK:
    """For every latent, the k entries with the largest score seen so far (score, example, value).

    With score = activation this keeps the top examples; with a random score, a uniform sample of the
    examples the latent fired on (reservoir sampling by random keys)."""

    def __init__(self, d_sae: int, k: int):
        self.d_sae, self.k = d_sae, k
        self.score_SK = torch.full((d_sae, k), float("-inf"))
        self.example_SK = torch.full((d_sae, k), -1, dtype=torch.int64)
        self.value_SK = torch.zeros(d_sae, k)

    @torch.no_grad()
    def update(self, latent_N: torch.Tensor, score_N: torch.Tensor, example_N: torch.Tensor,
               value_N: torch.Tensor) -> None:
        keep = score_N > self.score_SK[latent_N, -1]  # cannot enter a full list below its minimum
        if not bool(keep.any()):
            return
        latent = torch.cat([torch.arange(self.d_sae).repeat_interleave(self.k), latent_N[keep]])
        score = torch.cat([self.score_SK.flatten(), score_N[keep].float()])
        example = torch.cat([self.example_SK.flatten(), example_N[keep]])
        value = torch.cat([self.value_SK.flatten(), value_N[keep].float()])
        order = score.argsort(descending=True, stable=True)
        order = order[latent[order].argsort(stable=True)]  # by latent, best first within each
        latent, score, example, value = latent[order], score[order], example[order], value[order]
        starts = torch.bincount(latent, minlength=self.d_sae).cumsum(0) - torch.bincount(latent, minlength=self.d_sae)
        rank = torch.arange(len(latent)) - starts[latent]
        top = rank < self.k
        slot = latent[top] * self.k + rank[top]
        for dst, src in ((self.score_SK, score), (self.example_SK, example), (self.value_SK, value)):
            dst.view(-1)[slot] = src[top]

    def state_dict(self) -> dict:
        return {"score": self.score_SK, "example": self.example_SK, "value": self.value_SK}

    def load_state_dict(self, state: dict) -> None:
        self.score_SK, self.example_SK, self.value_SK = state["score"], state["example"], state["value"]


def per_example_max(example_N: torch.Tensor, latent_N: torch.Tensor, value_N: torch.Tensor, d_sae: int):
    """Collapse token rows to (example, latent) pairs with the latent's largest activation in the example."""
    key = example_N * d_sae + latent_N
    unique, inverse = torch.unique(key, return_inverse=True)
    best = torch.full((len(unique),), float("-inf")).scatter_reduce(0, inverse, value_N.float(), "amax")
    return unique // d_sae, unique % d_sae, best
