"""The model families saex knows: how to find their transformer trunk, blocks and MLP output.

One table instead of one class per family: every family is a transformer whose blocks sit in a
ModuleList and whose MLP output is a named sub-module of each block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from saex.data.base import Modality


@dataclass(frozen=True)
class Family:
    name: str
    modality: Modality
    model_types: tuple[str, ...]
    has_cls: bool = True  # vision: the first token is a class token (register tokens, if any, follow it)
    dual_tower: bool = False  # CLIP/SigLIP full models: run the vision tower, keep the text tower
    causal: bool = False


FAMILIES = (
    Family("clip", "image", ("clip", "clip_vision_model"), dual_tower=True),
    Family("siglip", "image", ("siglip", "siglip_vision_model", "siglip2", "siglip2_vision_model"),
           has_cls=False, dual_tower=True),
    Family("vit", "image", ("vit",)),
    Family("dinov2", "image", ("dinov2",)),
    Family("dinov2_with_registers", "image", ("dinov2_with_registers",)),  # [CLS], registers, patches
    Family("bert", "text", ("bert", "roberta", "xlm-roberta", "electra", "camembert")),
    Family("gpt2", "text", ("gpt2",), causal=True),
    Family("llama", "text", ("llama", "mistral", "qwen2", "qwen3"), causal=True),
)
# What each block adds to the residual stream through its MLP, first match wins: DINOv2 scales the
# MLP output (layer_scale2); BERT's (and old ViT's) `output.dense` precedes the residual add.
MLP_OUT_MODULES = ("layer_scale2", "mlp", "output.dense")
# What attention adds, likewise: DINOv2's layer_scale1; BERT's (and old ViT's) `attention.output.dense` precedes
# the residual add (and BERT's LayerNorm); the others' attention module returns it as its first output.
ATTN_OUT_MODULES = ("layer_scale1", "attention.output.dense", "self_attn", "attn", "attention")
# The MLP's input (after the norm that precedes it): BERT's `intermediate` reads the attention block's output.
MLP_IN_MODULES = ("mlp", "intermediate")


def family_of(model_type: str) -> Family:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = sorted(t for f in FAMILIES for t in f.model_types)
    raise ValueError(f"model type {model_type!r} is not supported; supported model types: {supported}")


def backbone_of(model: nn.Module, family: Family) -> nn.Module:
    """The module whose forward pass runs the hooked blocks (the vision tower for CLIP/SigLIP)."""
    if family.dual_tower and hasattr(model, "vision_model"):
        return model.vision_model
    return getattr(model, "base_model", model)


def blocks_of(backbone: nn.Module, n_layers: int) -> nn.ModuleList:
    for _, module in backbone.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise ValueError(f"{type(backbone).__name__} has no list of {n_layers} transformer blocks")


def mlp_out_directions(block: nn.Module, d_model: int) -> torch.Tensor:
    """[d_mlp, d_model]: the direction each MLP neuron writes into the residual stream (its output
    weights), layer scale included; what seed 002 compares SAE encoder vectors with."""
    module = mlp_out_of(block)
    scale = getattr(module, "lambda1", None)  # DINOv2's layer scale multiplies the MLP output
    if scale is not None:
        module = block.mlp
    linears = [m for m in module.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)
               and m.weight.dim() == 2 and d_model in m.weight.shape]
    if not linears:
        raise ValueError(f"{type(module).__name__} has no output projection of width {d_model}")
    last = linears[-1]
    w = last.weight.T if isinstance(last, nn.Linear) else last.weight  # GPT-2's Conv1D is [d_mlp, d_model]
    return (w * scale if scale is not None else w).detach()


def mlp_out_of(block: nn.Module) -> nn.Module:
    return _first_of(block, MLP_OUT_MODULES, "MLP output")


def site_module(block: nn.Module, site: str) -> nn.Module:
    """The sub-module of `block` whose output (hook_attn_out, hook_mlp_out) or input (hook_mlp_in) is the site."""
    if site == "hook_mlp_out":
        return mlp_out_of(block)
    if site == "hook_attn_out":
        return _first_of(block, ATTN_OUT_MODULES, "attention output")
    if site == "hook_mlp_in":
        return _first_of(block, MLP_IN_MODULES, "MLP input")
    raise ValueError(f"{site} is the block's own input or output, not a sub-module's")


def _first_of(block: nn.Module, paths: tuple[str, ...], what: str) -> nn.Module:
    for path in paths:
        try:
            return block.get_submodule(path)
        except AttributeError:
            continue
    raise ValueError(f"{type(block).__name__} has none of the {what} modules {paths}")
