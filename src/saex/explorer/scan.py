"""One resumable pass over the activation store that gathers what the feature index needs."""

from __future__ import annotations

import torch

from saex.analysis.topk import PerLatentTopK, per_example_max
from saex.sae import SAE
from saex.store import ActivationStore


class Scan:
    """Per latent: firing counts, activation sums and maxima, top examples and a uniform sample of the
    examples it fires on. Per example: its rows in the store, its label and its top features."""

    def __init__(self, d_sae: int, top: int, samples: int, per_example: int, seed: int = 0):
        self.d_sae, self.per_example = d_sae, per_example
        self.fires_S = torch.zeros(d_sae, dtype=torch.float64)
        self.sum_S = torch.zeros(d_sae, dtype=torch.float64)
        self.max_S = torch.zeros(d_sae)
        self.top = PerLatentTopK(d_sae, top)
        self.sample = PerLatentTopK(d_sae, samples)
        self.generator = torch.Generator().manual_seed(seed)
        self.examples: list[torch.Tensor] = []  # per shard: example index, first row, rows, label
        self.example_features: list[torch.Tensor] = []  # per shard: [E, per_example] latents and values
        self.rows, self.next_shard = 0, 0

    @torch.no_grad()
    def scan_shard(self, sae: SAE, store: ActivationStore, shard: int, column: str, chunk: int) -> None:
        acts = store.shard(shard, column)
        example = store.shard(shard, "example")
        label = store.shard(shard, "label")
        device = sae.W_enc.device
        parts = []
        for s in range(0, len(acts), chunk):
            x = acts[s:s + chunk].to(device, torch.float32)
            if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
                bad = [(shard, int(r)) for r in (~torch.isfinite(acts).all(1)).nonzero().flatten()]
                raise ValueError(f"{store.folder} holds activation rows with NaN or infinity, at "
                                 f"{store.describe_rows(bad)}; re-harvest the store before indexing it")
            code = sae.encode(x)
            values, indices = code.values_BK.cpu(), code.indices_BK.cpu()
            rows, slots = (values > 0).nonzero(as_tuple=True)
            latent, value = indices[rows, slots], values[rows, slots]
            self.fires_S += torch.bincount(latent, minlength=self.d_sae)
            self.sum_S += torch.bincount(latent, weights=value.double(), minlength=self.d_sae)
            self.max_S.scatter_reduce_(0, latent, value, "amax")
            parts.append((example[s + rows], latent, value))
        ex, lat, val = (torch.cat(p) for p in zip(*parts)) if parts else (torch.empty(0, dtype=torch.int64),) * 3
        ex, lat, val = per_example_max(ex, lat, val, self.d_sae)
        self.top.update(lat, val, ex, val)
        self.sample.update(lat, torch.rand(len(lat), generator=self.generator), ex, val)

        firsts = torch.cat([torch.tensor([0]), (example[1:] != example[:-1]).nonzero().squeeze(1) + 1])
        counts = torch.diff(torch.cat([firsts, torch.tensor([len(example)])]))
        shard_examples = example[firsts]
        self.examples.append(torch.stack([shard_examples, firsts + int(store.offsets[shard]), counts,
                                          label[firsts].long()], 1))
        local = _position_of(shard_examples, ex)
        best = PerLatentTopK(len(shard_examples), self.per_example)  # "latents" here are the shard's examples
        best.update(local, val, lat, val)
        self.example_features.append(torch.stack([best.example_SK.double(), best.value_SK.double()], 2))
        self.rows += len(acts)
        self.next_shard = shard + 1

    def example_table(self) -> torch.Tensor:
        """[E, 4]: example index, first row, number of rows, label."""
        return torch.cat(self.examples) if self.examples else torch.empty(0, 4, dtype=torch.int64)

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("fires_S", "sum_S", "max_S", "examples", "example_features",
                                               "rows", "next_shard")} | {
            "top": self.top.state_dict(), "sample": self.sample.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        for k in ("fires_S", "sum_S", "max_S", "examples", "example_features", "rows", "next_shard"):
            setattr(self, k, state[k])
        self.top.load_state_dict(state["top"])
        self.sample.load_state_dict(state["sample"])
        self.generator.set_state(state["generator"])


def _position_of(keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    order = keys.argsort()
    return order[torch.searchsorted(keys[order], queries)]
