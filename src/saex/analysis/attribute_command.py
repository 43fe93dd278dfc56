"""`saex attribute`: which pixels or tokens of one input cause a feature: gradient x input, integrated
gradients (with its completeness check) or occlusion, printed as a summary and written as
attribution.json (+ attribution.png, a heat-map overlay, for images) in one folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

METHODS = ("integrated-gradients", "gradient-x-input", "occlusion")  # attribution.METHODS, without importing torch


@dataclass
class AttributeConfig:
    run: str
    """Run folder (with acts/ and saes/)."""
    example: str
    """The input: a dataset example index (0..N-1), or a file: an image, or a .txt for text models."""
    feature: int
    """The SAE latent to explain."""
    sae: str | None = None
    """SAE under RUN/saes/ (needed when the run has several)."""
    method: Literal["integrated-gradients", "gradient-x-input", "occlusion"] = "integrated-gradients"
    """How: integrated gradients from a baseline (its attributions sum to the feature's change from it),
    gradient x input, or occlusion (the feature's drop when a patch or token window is blanked)."""
    steps: int = 64
    """Integrated gradients: points along the path from the baseline."""
    window: int | None = None
    """Occlusion: the blanked square's side in pixels (default: the model's patch size) or tokens (default 1)."""
    positions: list[int] = field(default_factory=list)
    """Token positions whose activation of the feature is explained (default: every selected token)."""
    out: str | None = None
    """Output folder (default: RUN/experiments/<sae>/<example>-attribute-<feature>-<method>/)."""
    device: str = "auto"
    """cpu, cuda, cuda:1, ... (auto: cuda when there is one)."""
    threads: int = 1
    """CPU threads for torch (0: torch's default, one per core)."""


def run_attribute(cfg: AttributeConfig) -> dict:
    import torch

    from saex.analysis import attribution
    from saex.analysis.experiment import Experiment
    from saex.atomic import atomic_write_bytes, atomic_write_json

    from saex.threads import torch_threads

    if cfg.threads < 0:
        raise ValueError(f"--threads {cfg.threads}: must be 0 or more")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    with torch_threads(cfg.threads):
        exp = Experiment(cfg.run, cfg.sae, device)
        inp, _ = exp.input_of(cfg.example)
        batch = exp.adapter.prepare([inp], exp.context)
        result = attribution.compute(cfg.method, exp.adapter, exp.sae, exp.point, exp.tokens, cfg.feature, batch,
                                     cfg.positions or None, steps=cfg.steps, window=cfg.window)
        png = (attribution.overlay_png(attribution.model_image(exp.adapter, batch), result.values)
               if exp.adapter.modality == "image" else None)
    out = result.to_json() | {"example": cfg.example, "sae": exp.sae_name, "hook": exp.hook}
    folder = Path(cfg.out) if cfg.out else (exp.run / "experiments" / exp.sae_name /
                                            f"{Path(cfg.example).name}-attribute-{cfg.feature}-{cfg.method}")
    if png is not None:
        atomic_write_bytes(folder / "attribution.png", png)
    atomic_write_json(folder / "attribution.json", out)
    print(_report(result, cfg, folder, png is not None))
    return out


def _report(result, cfg: AttributeConfig, folder: Path, png: bool) -> str:
    lines = [f"feature {cfg.feature} on example {cfg.example}: {result.value:.4f} (code value "
             f"{result.code_value:.4f}), {cfg.method}"]
    if result.completeness:
        c = result.completeness
        lines.append(f"completeness: attributions sum to {c['sum']:.4f}; F(input) - F(baseline) = {c['delta']:.4f} "
                     f"(relative error {c['relative_error']:.2%})")
    if result.tokens:
        ranked = sorted(result.token_values(), key=lambda tv: -abs(tv[1]))[:10]
        lines.append("tokens that matter most: " + ", ".join(f"{t!r} {v:+.3f}" for t, v in ranked))
    else:
        values = result.values
        flat = values.flatten().abs().argmax()
        lines.append(f"strongest pixel: row {int(flat) // values.shape[1]}, column {int(flat) % values.shape[1]} "
                     f"({float(values.flatten()[flat]):+.4f})")
    lines.append(f"wrote {folder / 'attribution.json'}" + (f" and {folder / 'attribution.png'}" if png else ""))
    return "\n".join(lines)
