"""SAELens' cfg.json: what each field means to the computation, and how saex honours it.

For the architectures saex reads (SAELens 6: standard, topk, jumprelu, gated), every config field that
changes what an SAE computes is either folded exactly into the weights or refused by name:

- `apply_b_dec_to_input` false (the encoder sees x, not x - b_dec): folded, the encoder biases take
  b_dec W_enc back (Gated's magnitude bias exp(r_mag) b_dec W_enc).
- `rescale_acts_by_decoder_norm` (topk): SAELens ranks and returns z * |W_dec row| and decodes
  f / |W_dec row|; W_enc, b_enc times the norms and W_dec over them compute the same thing, selection
  included (it is how SAELens itself exports such a TopK for inference).
- a JumpReLU `threshold` below 0: SAELens takes ReLU(z) 1[z > theta] = z 1[z > max(theta, 0)], so it
  is clamped at 0.
- `dtype`: the tensors must be stored in it; saex computes in float32 whatever it is.
- `normalize_activations` other than none, `reshape_activations` hook_z and `metadata.hook_head_index`:
  refused (a per-input normalisation cannot be folded; the others change what the SAE is applied to).
- transcoders (`transcoder`, `skip_transcoder`, `jumprelu_transcoder`, `jumprelu_skip_transcoder`; saex
  writes `<kind>_transcoder` and `<kind>_skip_transcoder` for the kinds SAELens has no transcoder of):
  `d_out` sizes W_dec [d_sae, d_out] and b_dec; the encoder reads x uncentred (`apply_b_dec_to_input` must
  be false, as SAELens requires); a skip-transcoder adds `W_skip` [d_out, d_in] x.
- configs from before SAELens 6 (no `sae_lens_version`): read with SAELens' own defaults (`activation_fn`
  topk with `activation_fn_kwargs.k` is a TopK, a boolean `normalize_activations`); another
  `activation_fn` is refused, as is a `scaling_factor` tensor other than ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

# the tensors a saved SAE of each architecture holds ("prolu": saex's own, written before saex saved
# ProLU as the JumpReLU it equals at inference)
TENSORS = {
    "standard": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "topk": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "jumprelu": ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"),
    "gated": ("W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"),
    "prolu": ("W_enc", "b_enc", "W_dec", "b_dec"),
}
SAELENS_TO_SAEX = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated"}
_TRANSCODER = re.compile(r"^(?:(?!skip_)(\w+?)_)?(skip_)?transcoder$")  # [kind_][skip_]transcoder; no kind: standard


def transcoder_name(kind: str, skip: bool) -> str:
    """The architecture name of a transcoder of SAELens kind `kind` (standard: SAELens' plain transcoder)."""
    return ("" if kind == "standard" else f"{kind}_") + ("skip_" if skip else "") + "transcoder"


def tensor_names(kind: str, skip: bool = False) -> tuple[str, ...]:
    return TENSORS[kind] + (("W_skip",) if skip else ())
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
LEGACY_TENSORS = ("scaling_factor",)  # SAELens 5's finetuning scale: only all ones can be dropped

_REFUSED = {
    "normalize_activations": ("none", "saex computes no per-input normalisation; SAELens' "
                              "fold_activation_norm_scaling_factor folds a constant scale (then 'none')"),
    "reshape_activations": ("none", "saex's SAEs take flat [..., d_in] activations and its models have no hook_z"),
}


@dataclass(frozen=True)
class SAELensConfig:
    """The fields of a SAELens cfg.json that saex's computation depends on, validated."""

    architecture: str  # the kind of activation (for a transcoder: what its name says before "transcoder")
    d_in: int
    d_sae: int
    dtype: str
    k: int | None
    apply_b_dec_to_input: bool
    rescale_acts_by_decoder_norm: bool
    legacy: bool  # written before SAELens 6
    transcoder: bool = False
    skip: bool = False
    d_out: int = 0  # a transcoder's target width

    def shapes(self) -> dict[str, tuple[int, ...]]:
        d_out = self.d_out or self.d_in
        special = {"W_enc": (self.d_in, self.d_sae), "W_dec": (self.d_sae, d_out), "b_dec": (d_out,),
                   "W_skip": (d_out, self.d_in)}
        return {name: special.get(name, (self.d_sae,)) for name in tensor_names(self.architecture, self.skip)}


def parse(cfg: dict, where: Path) -> SAELensConfig:
    """Validate `cfg` (the JSON object of `where`); ValueError naming the field for anything saex cannot honour."""
    metadata = _get(cfg, "metadata", dict, where, {})
    legacy = _is_legacy(cfg, metadata, where)
    if legacy:
        cfg = _from_legacy(cfg, where)
    arch = _get(cfg, "architecture", str, where)
    transcoder = _TRANSCODER.match(arch)
    if transcoder:
        arch = transcoder.group(1) or "standard"
    if arch not in TENSORS:
        raise ValueError(f"{where}: architecture {arch!r} is not one saex reads; it reads {sorted(SAELENS_TO_SAEX)} "
                         "(and 'prolu' from saex)")
    d_in, d_sae = (_get(cfg, name, int, where) for name in ("d_in", "d_sae"))
    for name, value in (("d_in", d_in), ("d_sae", d_sae)):
        if value < 1:
            raise ValueError(f"{where}: {name} is {value}; it must be a positive integer")
    dtype = _get(cfg, "dtype", str, where, "float32").removeprefix("torch.")
    if dtype not in DTYPES:
        raise ValueError(f"{where}: dtype {dtype!r} is not one of {sorted(DTYPES)}")
    for field, (valid, why) in _REFUSED.items():
        value = _get(cfg, field, str, where, valid)
        if value != valid:
            raise ValueError(f"{where}: {field}={value!r} is not supported ({why}); saex loads {field}={valid!r}")
    head = (cfg if legacy else metadata).get("hook_head_index")
    if head is not None:
        raise ValueError(f"{where}: hook_head_index={head!r} is not supported (the SAE reads one attention head, "
                         "and saex applies SAEs to whole hook points); saex loads hook_head_index=null")
    k = rescale = None
    if arch == "topk":
        k = _get(cfg, "k", int, where, 100)  # SAELens' default
        if not 1 <= k <= d_sae:
            raise ValueError(f"{where}: k={k} must lie in [1, d_sae={d_sae}]")
        rescale = _get(cfg, "rescale_acts_by_decoder_norm", bool, where, False)
    apply_b_dec = _get(cfg, "apply_b_dec_to_input", bool, where, not transcoder)
    if not transcoder:
        return SAELensConfig(arch, d_in, d_sae, dtype, k, apply_b_dec, bool(rescale), legacy)
    d_out = _get(cfg, "d_out", int, where)
    if d_out < 1:
        raise ValueError(f"{where}: d_out is {d_out}; it must be a positive integer")
    if apply_b_dec:
        raise ValueError(f"{where}: apply_b_dec_to_input=true is not supported for transcoders (b_dec lives in the "
                         "target's space; SAELens refuses it too); saex loads apply_b_dec_to_input=false")
    return SAELensConfig(arch, d_in, d_sae, dtype, k, False, bool(rescale), legacy, True,
                         bool(transcoder.group(2)), d_out)


@torch.no_grad()
def fold(c: SAELensConfig, t: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    """SAELens-named tensors rewritten so that saex's computation (x - b_dec always subtracted, no
    decoder-norm rescaling, ReLU'd JumpReLU codes) gives what SAELens computes with config `c`."""
    t = dict(t)
    if not c.apply_b_dec_to_input and not c.transcoder:  # a saex transcoder reads x uncentred too
        shift = t["b_dec"] @ t["W_enc"]
        if c.architecture == "gated":
            t["b_gate"] = t["b_gate"] + shift
            t["b_mag"] = t["b_mag"] + t["r_mag"].exp() * shift
        else:
            t["b_enc"] = t["b_enc"] + shift
    if c.rescale_acts_by_decoder_norm:
        norms = t["W_dec"].norm(dim=1)
        if not (norms > 0).all():
            raise ValueError(f"{where}: rescale_acts_by_decoder_norm=true, but W_dec rows "
                             f"{(norms == 0).nonzero().flatten().tolist()[:8]} are zero (SAELens divides by their norms)")
        t["W_enc"], t["b_enc"], t["W_dec"] = t["W_enc"] * norms, t["b_enc"] * norms, t["W_dec"] / norms[:, None]
    if c.architecture == "jumprelu":
        t["threshold"] = t["threshold"].clamp_min(0)
    return t


def _get(cfg: dict, name: str, kind: type, where: Path, default=...):
    if name not in cfg or (cfg[name] is None and default is not ...):
        if default is ...:
            raise ValueError(f"{where}: the field {name!r} is missing; it must be {_KIND[kind]}")
        return default
    value = cfg[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{where}: {name} is {value!r}; it must be {_KIND[kind]}")
    return value


_KIND = {int: "an integer", str: "a string", bool: "true or false", dict: "a JSON object"}


def _is_legacy(cfg: dict, metadata: dict, where: Path) -> bool:
    """SAELens' rule: a config without a sae_lens_version (top level or metadata) below 6 predates SAELens 6."""
    version = cfg.get("sae_lens_version") or metadata.get("sae_lens_version")
    if not version:
        return True
    major = re.match(r"\d+", version) if isinstance(version, str) else None
    if major is None:
        raise ValueError(f"{where}: sae_lens_version {version!r} is not a version such as '6.0.0'")
    return int(major.group()) < 6


def _from_legacy(cfg: dict, where: Path) -> dict:
    """A config from before SAELens 6 in SAELens 6's terms, as SAELens' handle_pre_6_0_config reads it."""
    renamed = {"hook_point_head_index": "hook_head_index", "activation_fn_str": "activation_fn"}
    cfg = {renamed.get(k, k): v for k, v in cfg.items()}
    cfg.setdefault("architecture", "standard")
    activation = cfg.get("activation_fn") or "relu"
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if activation == "topk" and isinstance(kwargs, dict) and kwargs.get("k") is not None:
        cfg["architecture"], cfg["k"] = "topk", kwargs["k"]
    elif activation != "relu":
        raise ValueError(f"{where}: activation_fn={activation!r} (a config from before SAELens 6) is not supported; "
                         "saex loads 'relu', or 'topk' with activation_fn_kwargs.k")
    if isinstance(cfg.get("normalize_activations"), bool):
        cfg["normalize_activations"] = "expected_average_only_in" if cfg["normalize_activations"] else "none"
    return cfg
