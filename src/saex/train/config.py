"""The training config: the SAE's own config plus how to train it, and sweeps over either."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Literal

from saex.sae.config import SAEConfig

# fields shared by every SAE of a sweep (one stream, one loop); everything else may be swept
SHARED = {"run", "hook", "target", "name", "steps", "batch_size", "seed", "device", "sweep", "checkpoint_every",
          "log_every", "overwrite", "dead_tokens", "autocast", "wandb_project", "verify", "skip_nonfinite",
          "threads"}


@dataclass
class TrainConfig(SAEConfig):
    run: str = field(default="", metadata={"required": True})
    """Run folder holding acts/ (from saex harvest); SAEs go to RUN/saes/<name>/."""
    hook: str | None = None
    """Hook point to train on (default: the store's only one)."""
    target: str | None = None
    """Train a transcoder: reconstruct this hook point from --hook's code (e.g. --hook blocks.1.hook_mlp_in
    --target blocks.1.hook_mlp_out; both harvested in one store)."""
    name: str | None = None
    """Name of the SAE (default: from the architecture and the swept values)."""
    expansion: int = 8
    """d_sae = expansion x d_in, unless --d-sae is given."""
    steps: int = 2000
    """Optimiser steps."""
    batch_size: int = 1024
    """Activations (tokens) per step."""
    lr: float = 5e-4
    """Adam learning rate after warm-up."""
    lr_warmup: float = 0.01
    """Fraction of steps of linear learning-rate warm-up."""
    lr_decay: float = 0.2
    """Fraction of final steps over which the learning rate decays linearly to 0."""
    sparsity_warmup: float = 0.05
    """Fraction of steps over which the sparsity coefficient ramps up from 0."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this (0: no clipping)."""
    b_dec_init: Literal["geometric_median", "mean", "zero"] = "geometric_median"
    """Initial decoder bias, from a sample of activations."""
    normalize: bool = True
    """Scale inputs so that E||x|| = sqrt(d_in) while training (folded into the saved weights)."""
    dead_tokens: int = 1_000_000
    """A latent that has not fired for this many tokens is dead (for AuxK, ghost grads, resampling)."""
    resample_every: int = 0
    """Anthropic resampling of dead latents every this many steps (0: never)."""
    resort_every: int = 0
    """Matryoshka: re-sort latents by firing frequency every this many steps (0: never)."""
    sweep: list[str] = field(default_factory=list)
    """Train several SAEs on one pass, e.g. k=16,32,64 or architecture=topk,batchtopk (cartesian product)."""
    seed: int = 0
    """Seed of initialisation and data order."""
    device: str = "auto"
    """cpu, cuda, ...; auto picks cuda when there is one."""
    autocast: bool = True
    """bfloat16 autocast where the hardware multiplies bfloat16 natively: GPUs, CPUs with AVX512-BF16 or AMX
    (weights and Adam stay float32)."""
    threads: int = 0
    """CPU threads of the training step (0: torch's count, fewer while other processes keep the cores busy;
    N: always N, for bit-for-bit reproducible runs on a shared machine)."""
    checkpoint_every: int = 500
    """Write a resumable checkpoint every this many steps."""
    log_every: int = 25
    """Log metrics to RUN/logs/train.jsonl every this many steps."""
    overwrite: bool = False
    """Retrain SAEs that already exist."""
    verify: bool = True
    """Check every shard's sha256 against the manifest in a background thread while training; a mismatch
    stops the run before anything is saved (--no-verify: shard sizes and headers only, checked on open)."""
    skip_nonfinite: bool = False
    """Train without activation rows holding NaN or infinity (counted in the log) instead of stopping at them."""
    wandb_project: str | None = None
    """Also log to this Weights & Biases project (needs wandb; WANDB_MODE=offline works without network)."""

    def sae_config(self, d_in: int, d_out: int = 0) -> SAEConfig:
        """The SAE's config for inputs of width d_in (a transcoder's targets: d_out, when --target is given)."""
        if self.skip and self.target is None:
            raise ValueError("--skip adds a skip path to a transcoder: give its target hook with --target")
        names = {f.name for f in dataclasses.fields(SAEConfig)}
        values = {k: v for k, v in dataclasses.asdict(self).items() if k in names}
        values.update(d_in=d_in, d_sae=self.d_sae or self.expansion * d_in)
        if self.target is not None:
            values.update(transcoder=True, d_out=d_out)
        return SAEConfig(**values).validate()

    def default_name(self, swept: dict) -> str:
        parts = [self.architecture + ("-matryoshka" if self.matryoshka != "none" else "")
                 + ("-transcoder" if self.target else "") + ("-skip" if self.skip and self.target else "")]
        parts += [f"{k}{v}" for k, v in swept.items() if k not in ("architecture", "matryoshka")]
        return "-".join(parts)


def _parse(cls, key: str, text: str):
    hints = {f.name: f.type for f in dataclasses.fields(cls)}
    if key not in hints or key in SHARED:
        sweepable = sorted(k for k in hints if k not in SHARED)
        raise ValueError(f"cannot sweep {key!r}; sweepable fields: {sweepable}")
    default = getattr(cls(run="x"), key)
    kind = type(default) if default is not None else str
    if kind is bool:
        return text.lower() in ("1", "true", "yes")
    return kind(text)


def expand_sweep(cfg: TrainConfig) -> list[tuple[str, TrainConfig]]:
    """(name, config) of each SAE: the cartesian product of the --sweep values."""
    axes = []
    for spec in cfg.sweep:
        key, sep, values = spec.partition("=")
        if not sep or not values:
            raise ValueError(f"sweep {spec!r} is not of the form key=v1,v2,...")
        axes.append([(key, _parse(TrainConfig, key, v)) for v in values.split(",")])
    variants = []
    for combo in itertools.product(*axes) if axes else [()]:
        swept = dict(combo)
        variant = dataclasses.replace(cfg, **swept)
        name = cfg.name + ("-" + "-".join(f"{k}{v}" for k, v in swept.items()) if swept else "") if cfg.name \
            else variant.default_name(swept)
        variants.append((name, variant))
    names = [n for n, _ in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"sweep gives duplicate SAE names {names}")
    return variants
