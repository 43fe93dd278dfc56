"""What an edit did downstream: the clean and the edited readouts of one example, compared the way its
model family allows (class or prompt probabilities, next-token distribution, embedding cosine)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compare(clean: dict, edited: dict, names: list[str] | None = None, top: int = 10) -> dict:
    """For one example: readouts {"logits": [C], "embedding": [D]} (either may be absent) -> a JSON-able
    summary. With `names` (class names, label prompts or token strings, one per logit)."""
    out = {}
    if "logits" in clean:
        p, q = F.log_softmax(clean["logits"].float(), -1), F.log_softmax(edited["logits"].float(), -1)
        delta = q.exp() - p.exp()
        name = (lambda i: names[i]) if names else str
        out["kl"] = float((p.exp() * (p - q)).sum())  # KL(clean || edited), nats
        out["top_clean"], out["top_edited"] = name(int(p.argmax())), name(int(q.argmax()))
        n = min(top, len(delta))
        out["gained"] = [{"name": name(i), "clean": float(p[i].exp()), "edited": float(q[i].exp()),
                          "delta": float(delta[i])} for i in delta.topk(n).indices.tolist() if delta[i] > 0]
        out["lost"] = [{"name": name(i), "clean": float(p[i].exp()), "edited": float(q[i].exp()),
                        "delta": float(delta[i])} for i in (-delta).topk(n).indices.tolist() if delta[i] < 0]
        if len(delta) <= 100:  # a classifier's or a label set's classes: all of them
            out["probs"] = [{"name": name(i), "clean": float(p[i].exp()), "edited": float(q[i].exp())}
                            for i in range(len(delta))]
    if "embedding" in clean:
        out["embedding_cosine"] = float(F.cosine_similarity(clean["embedding"].float(), edited["embedding"].float(),
                                                            dim=-1))
    return out


def mean_effect(clean_BC: torch.Tensor, edited_BC: torch.Tensor) -> dict:
    """Over a batch of examples: the mean change of each class's probability and the mean KL."""
    p, q = F.log_softmax(clean_BC.float(), -1), F.log_softmax(edited_BC.float(), -1)
    return {"delta_C": (q.exp() - p.exp()).mean(0), "kl": (p.exp() * (p - q)).sum(-1).mean()}
