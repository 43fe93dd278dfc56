"""What each family computes downstream of the hooked layer, so that eval can splice an SAE in and
measure what its reconstruction costs: classifier logits, next-token logits, CLIP zero-shot logits
over label prompts, or sentence embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from saex.models.adapter import Batch, ModelAdapter

def head_kind(adapter: ModelAdapter) -> str | None:
    model, family = adapter.model, adapter.family
    if family.name == "clip" and hasattr(model, "text_model"):
        return "zero_shot"
    if family.causal and model.get_output_embeddings() is not None:
        return "next_token"
    if any(a.endswith("ForImageClassification") for a in model.config.architectures or []) and hasattr(model, "classifier"):
        return "classifier"
    if family.name == "bert":
        return "embedding"
    return None


@torch.inference_mode()
def prompt_features(adapter: ModelAdapter, label_names: list[str], template: str = "a photo of a {}.") -> torch.Tensor:
    """CLIP text features of one prompt per label, normalised."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(adapter.source)
    enc = tok([template.format(n) for n in label_names], padding=True, return_tensors="pt").to(adapter.device)
    feats = adapter.model.get_text_features(**enc)
    feats = getattr(feats, "pooler_output", feats)
    return F.normalize(feats.float(), dim=-1)


@torch.inference_mode()
def head_output(adapter: ModelAdapter, batch: Batch, kind: str, prompts: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 logits [B, C] (classifier, zero_shot), [B, T, V] (next_token) or embeddings [B, D]."""
    model = adapter.model
    batch = adapter.on_device(batch)
    if kind == "zero_shot":
        return readout(adapter, batch, kind, prompts)["logits"]
    if kind == "embedding":
        hidden = model(**batch.inputs).last_hidden_state.float()
        mask = batch.inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1), dim=-1)
    return model(**batch.inputs).logits.float()


@torch.inference_mode()
def readout(adapter: ModelAdapter, batch: Batch, kind: str, prompts: torch.Tensor | None = None) -> dict:
    """What an edit can change downstream, per example: `logits` [B, C] over classes or label prompts,
    or [B, V] for the next token after the last real one; `embedding` [B, D] (CLIP's image embedding,
    a sentence encoder's mean-pooled one), normalised."""
    model = adapter.model
    batch = adapter.on_device(batch)
    if kind == "zero_shot":
        feats = model.get_image_features(**batch.inputs)
        feats = F.normalize(getattr(feats, "pooler_output", feats).float(), dim=-1)
        return {"logits": model.logit_scale.exp().float() * feats @ prompts.T, "embedding": feats}
    if kind == "embedding":
        return {"embedding": head_output(adapter, batch, kind)}
    logits = head_output(adapter, batch, kind)
    if kind == "next_token":
        last = batch.inputs["attention_mask"].sum(1) - 1
        logits = logits[torch.arange(len(logits), device=logits.device), last]
    return {"logits": logits}
