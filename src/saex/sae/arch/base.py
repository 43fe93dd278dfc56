"""The pluggable part of an SAE: its activation function and its sparsity/auxiliary losses."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from saex.sae.code import Code


@dataclass
class TrainContext:
    """What the training loop tells an architecture at each step."""

    sparsity_coefficient: float = 0.0  # lambda after its warm-up
    dead_S: torch.Tensor | None = None  # bool: latents that have not fired for the dead window
    generator: torch.Generator | None = None  # for random Matryoshka prefixes
    n_dead: int | None = None  # how many are dead as the host last counted them (None: count dead_S now)

    def dead_count(self) -> int:
        """Dead latents on the host's count: the trainer's (recounted every few steps, sparing the GPU a
        sync per step), or dead_S's when none was given."""
        if self.dead_S is None:
            return 0
        return self.n_dead if self.n_dead is not None else int(self.dead_S.sum())


@dataclass
class TrainOutput:
    x_hat_BD: torch.Tensor
    losses: dict[str, torch.Tensor]  # named terms; their sum is what is minimised
    fired_S: torch.Tensor  # bool: which latents fired on this batch
    l0: torch.Tensor  # mean active latents per row
    extras: dict = field(default_factory=dict)

    @property
    def loss(self) -> torch.Tensor:
        return sum(self.losses.values())


def sum_sq(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> torch.Tensor:
    """Squared error summed over dimensions, averaged over rows."""
    return (x_BD - x_hat_BD).pow(2).sum(-1).mean()


class Architecture(nn.Module):
    """Subclasses may own parameters (a JumpReLU threshold, Gated's magnitude path)."""

    saelens_name = "standard"

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg

    def encode(self, sae, x_BD: torch.Tensor) -> Code:
        raise NotImplementedError

    def train_forward(self, sae, x_BD: torch.Tensor, ctx: TrainContext) -> TrainOutput:
        raise NotImplementedError

    def init_from_data(self, sae, x_ND: torch.Tensor) -> None:
        """Data-dependent initialisation from a sample of (scaled) inputs, after b_dec is set."""

    def before_optimizer_step(self, sae) -> None:
        """Adjust gradients (e.g. keep unit-norm decoder rows on their sphere)."""

    def after_optimizer_step(self, sae) -> None:
        """Project parameters back (e.g. renormalise decoder rows, keep thresholds positive)."""

    def inference_state(self, sae) -> tuple[str, dict[str, torch.Tensor]]:
        """The SAELens architecture name and the extra tensors an inference-time SAE needs."""
        return self.saelens_name, {}


def project_decoder_grad(sae) -> None:
    """Remove the gradient component parallel to each decoder row (rows stay on the unit sphere)."""
    if sae.W_dec.grad is not None:
        w = sae.W_dec.data / sae.W_dec.data.norm(dim=1, keepdim=True)
        sae.W_dec.grad -= (sae.W_dec.grad * w).sum(1, keepdim=True) * w


def renormalize_decoder(sae) -> None:
    sae.W_dec.data /= sae.W_dec.data.norm(dim=1, keepdim=True)


def dense_output(sae, x_BD, f_BS, losses: dict, extras=None) -> TrainOutput:
    """TrainOutput of an architecture whose code is a dense [B, S] tensor."""
    x_hat = f_BS @ sae.W_dec + sae.b_dec
    losses = {"mse": sum_sq(x_BD, x_hat), **losses}
    active = f_BS != 0
    return TrainOutput(x_hat, losses, active.any(0), active.sum(-1).float().mean(), extras or {})
