"""Load a transformer by name and capture its activations at named hook points."""

from __future__ import annotations

from pathlib import Path

import torch

from saex.models.adapter import DEFAULT_TOKENS, TOKEN_CHOICES, Batch, ModelAdapter
from saex.models.families import FAMILIES, family_of
from saex.models.hooks import SITES, HookPoint, parse_hook
from saex.models.zoo import ZOO


def _model_class(config):
    import transformers

    archs = config.architectures or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return transformers.AutoModelForCausalLM
    if any(a.endswith("ForImageClassification") for a in archs):
        return transformers.AutoModelForImageClassification
    return transformers.AutoModel


def _processor(folder: str, modality: str):
    import transformers

    if modality == "image":
        return transformers.AutoImageProcessor.from_pretrained(folder)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.padding_side = "right"
    return tok


def resolve(name: str) -> str:
    """A zoo name's folder, or the name itself (a local folder or a Hugging Face hub id)."""
    return str(ZOO[name].locate()) if name in ZOO else name


def load_model(name: str, device: str = "cpu", dtype: torch.dtype | None = None) -> ModelAdapter:
    """A zoo name (`minilm`, `fmnist-vit`), a local model folder, or a Hugging Face hub id."""
    import transformers

    folder = resolve(name)
    try:
        config = transformers.AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as e:
        where = "a local folder without a usable config.json" if Path(folder).is_dir() else "not a local folder"
        raise ValueError(f"unknown model {name!r}: not a zoo model ({', '.join(ZOO)}), {where}, and the "
                         f"Hugging Face hub could not provide it ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    family = family_of(config.model_type)
    model = _model_class(config).from_pretrained(folder)
    adapter = ModelAdapter(model, _processor(folder, family.modality), name, device, dtype)
    adapter.source = folder
    return adapter


__all__ = ["DEFAULT_TOKENS", "FAMILIES", "SITES", "TOKEN_CHOICES", "Batch", "HookPoint", "ModelAdapter",
           "ZOO", "family_of", "load_model", "parse_hook", "resolve"]
