"""Spliced downstream metrics: run the model with the hooked activations replaced by the SAE's
reconstruction (and, as the floor, by zeros) and compare its losses with the clean run.

loss_recovered = (loss_zero - loss_sae) / (loss_zero - loss_clean); kl = KL(clean || spliced).
Losses by head: classifier and zero_shot: cross-entropy on the labels (plus accuracy); next_token:
next-token cross-entropy; embedding: 1 - cosine with the clean sentence embedding (so loss_clean = 0)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

VARIANTS = ("clean", "sae", "zero")


def _kl(clean_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return F.kl_div(F.log_softmax(logits, -1), F.log_softmax(clean_logits, -1), log_target=True,
                    reduction="none").sum(-1)


class SpliceStats:
    def __init__(self, kind: str):
        self.kind = kind
        self.sums = {f"loss_{v}": 0.0 for v in VARIANTS}
        self.kl = {v: 0.0 for v in VARIANTS}
        self.correct = {v: 0.0 for v in VARIANTS}
        self.count = 0

    @torch.no_grad()
    def update(self, outputs: dict[str, torch.Tensor], labels_B: torch.Tensor | None,
               attention_BT: torch.Tensor | None) -> None:
        clean = outputs["clean"]
        if self.kind == "next_token":
            ids = outputs["input_ids"]
            mask = (attention_BT[:, 1:] * attention_BT[:, :-1]).bool()
            for v in VARIANTS:
                logits = outputs[v][:, :-1][mask]
                self.sums[f"loss_{v}"] += float(F.cross_entropy(logits, ids[:, 1:][mask], reduction="sum"))
                self.kl[v] += float(_kl(clean[:, :-1][mask], logits).sum())
            self.count += int(mask.sum())
        elif self.kind == "embedding":
            for v in VARIANTS:
                self.sums[f"loss_{v}"] += float((1 - F.cosine_similarity(outputs[v], clean, dim=-1)).sum())
            self.count += len(clean)
        else:
            valid = labels_B >= 0
            for v in VARIANTS:
                logits = outputs[v][valid]
                self.sums[f"loss_{v}"] += float(F.cross_entropy(logits, labels_B[valid], reduction="sum"))
                self.kl[v] += float(_kl(clean[valid], logits).sum())
                self.correct[v] += float((logits.argmax(-1) == labels_B[valid]).sum())
            self.count += int(valid.sum())

    def result(self) -> dict:
        if not self.count:
            raise ValueError(f"no {self.kind} loss could be computed (no labels or no tokens)")
        out = {"head": self.kind, **{k: v / self.count for k, v in self.sums.items()}}
        gap = out["loss_zero"] - out["loss_clean"]
        out["loss_recovered"] = (out["loss_zero"] - out["loss_sae"]) / gap if gap > 0 else float("nan")
        if self.kind != "embedding":
            out["kl"], out["kl_zero"] = self.kl["sae"] / self.count, self.kl["zero"] / self.count
        if self.kind in ("classifier", "zero_shot"):
            out.update({f"accuracy_{v}": self.correct[v] / self.count for v in VARIANTS})
        return out
