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


_FINAL_NORMS = ("ln_f", "norm", "final_layernorm", "final_layer_norm", "layernorm", "post_layernorm")


@torch.inference_mode()
def lens_readout(adapter: ModelAdapter, label_names: list[str] | None = None) -> dict | None:
    """What a d_in vector of the residual stream means through the model's readout, by the direct path (the
    logit lens: later blocks skipped, the vector fed straight to the final norm and the head). None for a model
    with none (a vision encoder without classifier or text tower).

    Returns `kind` (head_kind's), `norm` ("layernorm", "rmsnorm" or None: how analysis.lens rescales the vector
    before `pre`), `pre_DE` [d_in, E] (the norm's linear part: centring for LayerNorm, then its weight gamma; then
    CLIP's visual projection), `out_VE` [V, E] (unembedding rows, classifier rows, label prompts' text features or
    input embeddings), `cosine` (outputs are read by cosine, not dot product), `names` (one per output) and `path`
    (the path in words). Biases (the norm's beta, a classifier's bias) are left out: they add the same logits
    whatever the vector, so a feature's lens is what its vector adds."""
    model, kind = adapter.model, head_kind(adapter)
    if kind is None:
        return None
    d = adapter.d_model
    if kind == "embedding":  # a sentence encoder: no head, nearest input embeddings by cosine
        out = model.get_input_embeddings().weight
        return {"kind": kind, "norm": None, "pre_DE": torch.eye(d), "out_VE": out.detach().float().cpu(),
                "cosine": True, "names": _token_names(adapter.processor, out.shape[0]),
                "path": "cosine with the input embedding matrix (no LM head)"}
    tower = adapter.backbone
    norm = next((getattr(tower, n) for n in _FINAL_NORMS if isinstance(getattr(tower, n, None), torch.nn.Module)), None)
    if norm is None or getattr(norm, "weight", None) is None:
        raise ValueError(f"{type(tower).__name__} has no final norm with a weight among {_FINAL_NORMS}")
    layer_norm = isinstance(norm, torch.nn.LayerNorm)
    if not layer_norm and "RMSNorm" not in type(norm).__name__:
        raise ValueError(f"final norm {type(norm).__name__} is neither LayerNorm nor RMSNorm")
    pre = torch.diag(norm.weight.detach().float().cpu())
    if layer_norm:  # v - mean(v) = C v with C = I - 11^T/d, symmetric: (C v)^T diag(g) = v^T (C diag(g))
        pre = pre - pre.mean(0, keepdim=True)
    where = f"{type(norm).__name__} ({'centred, ' if layer_norm else ''}times its weight)"
    if kind == "next_token":
        out = model.get_output_embeddings().weight
        return {"kind": kind, "norm": "layernorm" if layer_norm else "rmsnorm", "pre_DE": pre,
                "out_VE": out.detach().float().cpu(), "cosine": False, "names": _token_names(adapter.processor, out.shape[0]),
                "path": f"direct path: final {where}, then the unembedding"}
    if kind == "classifier":
        out = model.classifier.weight
        id2label = model.config.id2label or {}
        return {"kind": kind, "norm": "layernorm" if layer_norm else "rmsnorm", "pre_DE": pre,
                "out_VE": out.detach().float().cpu(), "cosine": False,
                "names": [str(id2label.get(i, id2label.get(str(i), i))) for i in range(out.shape[0])],
                "path": f"direct path: final {where}, then the classifier's weights (the class token's head)"}
    if not label_names:  # zero_shot
        return None
    proj = model.visual_projection.weight.detach().float().cpu()  # [P, d]
    return {"kind": kind, "norm": "layernorm" if layer_norm else "rmsnorm", "pre_DE": pre @ proj.T,
            "out_VE": prompt_features(adapter, list(label_names)).float().cpu(), "cosine": True,
            "names": list(label_names),
            "path": f"direct path: {where}, the visual projection, then cosine with the label prompts' text features"}


def _token_names(tokenizer, n: int) -> list[str]:
    """Each token id's text as it reads in a decoded string (GPT-2's 'Ġthe' is ' the'); ids the tokenizer does
    not have (a padded vocabulary) read as <id N>."""
    known = min(n, len(tokenizer))
    names = tokenizer.batch_decode([[i] for i in range(known)], clean_up_tokenization_spaces=False)
    return names + [f"<id {i}>" for i in range(known, n)]
