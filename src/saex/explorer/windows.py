"""Text features: the tokens around each top example's strongest token, with the feature's activation."""

from __future__ import annotations

import json
from collections import defaultdict

import torch


@torch.no_grad()
def token_windows(store, sae, hook: str, scan, examples: torch.Tensor, manifest: dict, window: int) -> dict:
    """{(feature, example): JSON [[token, activation], ...]} for every (feature, top example) pair."""
    import transformers

    from saex.models import resolve

    tokenizer = transformers.AutoTokenizer.from_pretrained(resolve(manifest["model"]))
    column = store.acts(hook)
    rows_of = {ex: (first, n) for ex, first, n, _ in examples.tolist()}
    needed: dict[int, list[int]] = defaultdict(list)
    for feature, row in enumerate(scan.top.example_SK.tolist()):
        for ex in row:
            if ex >= 0:
                needed[ex].append(feature)
    out = {}
    for ex, features in needed.items():
        first, n = rows_of[ex]
        rows = torch.arange(first, first + n)
        acts = sae.encode(store.take(column, rows).float()).dense()[:, features]
        tokens = tokenizer.convert_ids_to_tokens(store.take("token", rows).tolist())
        for i, feature in enumerate(features):
            a = acts[:, i]
            centre = int(a.argmax())
            lo, hi = max(0, centre - window), min(n, centre + window + 1)
            out[(feature, ex)] = json.dumps([[tokens[t], round(float(a[t]), 4)] for t in range(lo, hi)])
    return out
