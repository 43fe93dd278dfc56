"""The pluggable part of an SAE: its activation function and its sparsity/auxiliary losses."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from saex.sae.code import Code, active_counts, fired_columns


@dataclass
class TrainContext:
    """What the training loop tells an architecture at each step."""

    sparsity_coefficient: float = 0.0  # lambda after its warm-up
    dead_S: torch.Tensor | None = None  # bool: latents that have not fired for the dead window
    generator: torch.Generator | None = None  # for random Matryoshka prefixes
    n_dead: int | None = None  # how many are dead as the host last counted them (None: count dead_S now)
    target_BD: torch.Tensor | None = None  # a transcoder's target less its skip path (None: the input itself)

    def target(self, x_BD: torch.Tensor) -> torch.Tensor:
        """What the code must reconstruct: the input (an SAE) or the transcoder's target."""
        return x_BD if self.target_BD is None else self.target_BD

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


class RoutedByDensity(Architecture):
    """An architecture whose codes start dense and grow sparse as its penalty bites (ReLU + L1, JumpReLU,
    Gated, ProLU): a step takes the sparse kernels (`sparse_forward`) after one whose `sparse_entries`
    per row (its L0, or Gated's open gates) were at most `sparse_max_density` of d_sae, else dense
    autograd (`dense_forward`); the first step, whose count is unknown, is dense. The last count is a
    buffer, so that a resumed run takes the same paths."""

    sparse_max_density: float  # the fraction of d_sae past which the sparse step stops paying

    def __init__(self, cfg):
        super().__init__(cfg)
        self.register_buffer("recent_l0", torch.tensor(float("inf")))
        self.register_load_state_dict_pre_hook(_default_recent_l0)

    def sparse_serves(self, ctx: TrainContext) -> bool:
        """Whether the sparse path can serve this step at all (beyond the L0 test)."""
        return True

    def train_forward(self, sae, x_BD, ctx: TrainContext) -> TrainOutput:
        sparse = (self.cfg.encoder_kernel == "sparse" and self.sparse_serves(ctx)
                  and float(self.recent_l0) <= sae.d_sae * self.sparse_max_density)
        out = self.sparse_forward(sae, x_BD, ctx) if sparse else self.dense_forward(sae, x_BD, ctx)
        self.recent_l0.copy_(self.sparse_entries(out).detach())
        return out

    def sparse_entries(self, out: TrainOutput) -> torch.Tensor:
        """Entries per row a sparse step carries, as this step saw them: its L0 unless overridden."""
        return out.l0

    def sparse_forward(self, sae, x_BD, ctx: TrainContext) -> TrainOutput:
        raise NotImplementedError

    def dense_forward(self, sae, x_BD, ctx: TrainContext) -> TrainOutput:
        raise NotImplementedError


def _default_recent_l0(module, state: dict, prefix: str, *_) -> None:
    """Training checkpoints written before an architecture joined the routing lack its L0: unknown."""
    state.setdefault(f"{prefix}recent_l0", torch.tensor(float("inf")))


def project_decoder_grad(sae) -> None:
    """Remove the gradient component parallel to each decoder row (rows stay on the unit sphere)."""
    if sae.W_dec.grad is not None:
        w = sae.W_dec.data / sae.W_dec.data.norm(dim=1, keepdim=True)
        sae.W_dec.grad -= (sae.W_dec.grad * w).sum(1, keepdim=True) * w


def renormalize_decoder(sae) -> None:
    sae.W_dec.data /= sae.W_dec.data.norm(dim=1, keepdim=True)


def weighted_l1(f_BS: torch.Tensor, w_S: torch.Tensor) -> torch.Tensor:
    """sum_s w_s |f_s| of non-negative codes, averaged over rows: a matrix-vector product (under autocast
    in bfloat16 with no float32 copy of f; 1.2 against 2.5 ms for the product and sum at 1,024 x 6,144 on 2
    CPU cores)."""
    return (f_BS @ w_S).mean()


def dense_output(sae, target_BD, f_BS, losses: dict, extras=None) -> TrainOutput:
    """TrainOutput of an architecture whose code is a dense [B, S] tensor (target: TrainContext.target)."""
    x_hat = f_BS @ sae.W_dec + sae.b_dec
    losses = {"mse": sum_sq(target_BD, x_hat), **losses}
    active_BS = f_BS.detach().bool()
    return TrainOutput(x_hat, losses, fired_columns(active_BS), active_counts(active_BS, -1).float().mean(), extras or {})

