"""Saved SAEs: a folder with cfg.json and sae_weights.safetensors that SAELens reads.

The input scale is folded into the weights before saving, so a saved SAE takes raw activations.
Loading also reads SAELens folders and sparsify folders (cfg.json + sae.safetensors)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from saex import __version__
from saex.sae.config import SAEConfig
from saex.sae.model import SAE

CFG, WEIGHTS, SPARSIFY_WEIGHTS = "cfg.json", "sae_weights.safetensors", "sae.safetensors"
SAELENS_LAYOUT = "6.0.0"
SAELENS_TO_SAEX = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated"}


def saved_saes(folder: str | Path, names: list[str] | None = None) -> list[Path]:
    """SAE folders (those holding a cfg.json) directly in `folder`, sorted; `names` picks and checks some."""
    folder = Path(folder)
    found = sorted(p.parent for p in folder.glob(f"*/{CFG}"))
    if not found:
        raise ValueError(f"no trained SAE in {folder}; run saex train first")
    if names:
        missing = [n for n in names if not (folder / n / CFG).exists()]
        if missing:
            raise ValueError(f"no SAE named {missing} in {folder}; it has {[p.name for p in found]}")
        return [folder / n for n in names]
    return found


def save_sae(sae: SAE, folder: str | Path, extra_metadata: dict | None = None) -> Path:
    """Write `folder` atomically (a temporary folder renamed into place)."""
    from saex.atomic import atomic_folder

    arch_name, extra = sae.arch.inference_state(sae)
    weights = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec, **extra}
    if arch_name == "gated":
        weights.pop("b_enc")  # SAELens calls it b_gate
    metadata = {**sae.metadata, **(extra_metadata or {})}
    cfg = {
        "architecture": arch_name, "d_in": sae.d_in, "d_sae": sae.d_sae, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none",
        # sae_lens_version names the cfg layout we write (SAELens 6), so that SAELens reads the metadata
        "metadata": {"sae_lens_version": SAELENS_LAYOUT, "model_name": metadata.get("model"),
                     "hook_name": metadata.get("hook"), **metadata},
        "saex": {"version": __version__, "sae": dataclasses.asdict(sae.cfg)},
    }
    if arch_name == "topk":
        cfg["k"] = sae.cfg.k
    with atomic_folder(Path(folder)) as tmp:
        save_file({k: v.detach().float().contiguous().cpu() for k, v in weights.items()}, tmp / WEIGHTS)
        (tmp / CFG).write_text(json.dumps(cfg, indent=2) + "\n")
    return Path(folder)


def load_sae(folder: str | Path, device: str = "cpu") -> SAE:
    """A saex, SAELens or sparsify SAE folder."""
    folder = Path(folder)
    if not (folder / CFG).exists():
        raise FileNotFoundError(f"no SAE at {folder}: {CFG} is missing")
    cfg = json.loads((folder / CFG).read_text())
    if (folder / SPARSIFY_WEIGHTS).exists() and not (folder / WEIGHTS).exists():
        return _load_sparsify(folder, cfg).to(device)
    weights = load_file(folder / WEIGHTS)
    if "saex" in cfg:
        known = {f.name for f in dataclasses.fields(SAEConfig)}
        sae_cfg = SAEConfig(**{k: v for k, v in cfg["saex"]["sae"].items() if k in known})
    else:
        arch = SAELENS_TO_SAEX.get(cfg["architecture"])
        if arch is None:
            raise ValueError(f"{folder}: SAELens architecture {cfg['architecture']!r} is not one saex loads; "
                             f"it loads {sorted(SAELENS_TO_SAEX)}")
        sae_cfg = SAEConfig(d_in=cfg["d_in"], d_sae=cfg["d_sae"], architecture=arch, k=cfg.get("k", 32))
        if cfg.get("normalize_activations", "none") != "none":
            raise ValueError(f"{folder}: normalize_activations={cfg['normalize_activations']!r} is not folded into "
                             "the weights; saex loads SAELens SAEs with normalize_activations='none'")
    sae = SAE(sae_cfg, metadata=cfg.get("metadata", {}))
    with torch.no_grad():
        for name in ("W_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(weights[name])
        sae.b_enc.copy_(weights["b_gate"] if sae_cfg.architecture == "gated" else weights["b_enc"])
        if sae_cfg.architecture == "gated":
            sae.arch.r_mag.copy_(weights["r_mag"])
            sae.arch.b_mag.copy_(weights["b_mag"])
        elif sae_cfg.architecture == "jumprelu":
            sae.arch.threshold.copy_(weights["threshold"])
        elif sae_cfg.architecture == "batchtopk":
            sae.arch.threshold.copy_(weights["threshold"][0])
    return sae.to(device).eval()


def _load_sparsify(folder: Path, cfg: dict) -> SAE:
    weights = load_file(folder / SPARSIFY_WEIGHTS)
    if cfg.get("activation", "topk") != "topk" or cfg.get("skip_connection") or cfg.get("transcode"):
        raise ValueError(f"{folder}: saex loads sparsify TopK SAEs without skip connection or transcoding")
    d_sae, d_in = weights["encoder.weight"].shape
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=cfg["k"]), metadata={"source": "sparsify"})
    with torch.no_grad():
        sae.W_enc.copy_(weights["encoder.weight"].T)
        sae.b_enc.copy_(weights["encoder.bias"])
        sae.W_dec.copy_(weights["W_dec"])
        sae.b_dec.copy_(weights["b_dec"])
    return sae.eval()
