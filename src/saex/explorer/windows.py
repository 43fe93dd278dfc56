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
        ids = store.take("token", rows).tolist()
        for i, feature in enumerate(features):
            a = acts[:, i]
            centre = int(a.argmax())
            lo, hi = max(0, centre - window), min(n, centre + window + 1)
            pieces = surface_pieces(tokenizer, ids[lo:hi])
            out[(feature, ex)] = json.dumps([[pieces[t - lo], round(float(a[t]), 4)] for t in range(lo, hi)])
    return out


def surface_pieces(tokenizer, ids: list[int]) -> list[str]:
    """Each token as it appears in the decoded text, spaces included (WordPiece "##", BPE "Ġ" and
    SentencePiece "▁" markers resolved by the tokenizer itself): decode prefixes and take differences."""
    pieces, previous = [], ""
    for t in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:t], clean_up_tokenization_spaces=False)
        pieces.append(text[len(previous):] if text.startswith(previous) else tokenizer.decode(ids[t - 1:t]))
        previous = text
    return pieces
