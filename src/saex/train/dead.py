"""Dead latents: tracking, and Anthropic's resampling."""

from __future__ import annotations

import torch

from saex.sae import SAE
from saex.train.optim import reset_latents


class DeadTracker:
    """Tokens since each latent last fired; dead past `window` tokens."""

    RECOUNT_EVERY = 64  # updates between the host's counts of the dead (each one waits for the GPU)

    def __init__(self, d_sae: int, window: int, device):
        self.window = window
        self.since_S = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.total = 0
        self.updates = 0
        self.counted = (0, -1)  # (count, at update): the host's last count of the dead

    def update(self, fired_S: torch.Tensor, n_tokens: int) -> None:
        self.since_S += n_tokens
        self.since_S.masked_fill_(fired_S, 0)  # no host sync, unlike boolean indexing
        self.total += n_tokens
        self.updates += 1

    def dead(self) -> torch.Tensor:
        return self.since_S >= self.window

    def count(self) -> int:
        """How many latents are dead, on the host: 0 while fewer than `window` tokens have passed (none can
        be dead yet), else counted every RECOUNT_EVERY updates (a latent that dies in between joins AuxK
        up to that many steps late; one that revives contributes zeros)."""
        if self.total < self.window:
            return 0
        if self.counted[1] < 0 or self.updates - self.counted[1] >= self.RECOUNT_EVERY:
            self.counted = (int(self.dead().sum()), self.updates)
        return self.counted[0]

    def state_dict(self) -> dict:
        return {"since_S": self.since_S.cpu(), "total": self.total, "updates": self.updates,
                "counted": list(self.counted)}

    def load_state_dict(self, state: dict) -> None:
        self.since_S.copy_(state["since_S"])
        self.total = state["total"]
        self.updates = state.get("updates", 0)
        self.counted = tuple(state.get("counted", (0, -1)))


@torch.no_grad()
def resample_dead(sae: SAE, opt, x_BD: torch.Tensor, dead_S: torch.Tensor, generator=None,
                  y_BD: torch.Tensor | None = None) -> int:
    """Re-initialise dead latents from inputs drawn in proportion to their squared reconstruction loss
    (Towards Monosemanticity): decoder row = the target's direction (the input's, for an SAE), encoder =
    the input's direction scaled to 0.2 x the mean alive encoder norm, bias 0, Adam moments reset.
    Returns how many were resampled."""
    dead = dead_S.nonzero().squeeze(1)
    if dead.numel() == 0:
        return 0
    truth = x_BD if y_BD is None else y_BD
    loss_B = (truth - sae(x_BD)).pow(2).sum(-1)
    rows = torch.multinomial(loss_B.pow(2) + 1e-12, dead.numel(), replacement=True, generator=generator)
    unit = lambda v: v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)  # noqa: E731
    out_dir, in_dir = unit(truth[rows] - sae.b_dec), unit(x_BD[rows] - sae.b_in)
    alive = ~dead_S
    enc_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
    sae.W_dec[dead] = out_dir * (sae.W_dec[alive].norm(dim=1).mean() if alive.any() else 1.0)
    sae.W_enc[:, dead] = (in_dir * 0.2 * enc_norm).T
    sae.b_enc[dead] = 0.0
    reset_latents(opt, sae.latent_parameters(), dead)
    return int(dead.numel())
