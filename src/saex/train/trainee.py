"""One SAE being trained: its parameters, optimiser, dead-latent tracker and step."""

from __future__ import annotations

import contextlib

import torch

from saex.sae import SAE
from saex.sae.arch import TrainContext
from saex.sae.kernels.precision import native_bfloat16
from saex.train.config import TrainConfig
from saex.train.dead import DeadTracker, resample_dead
from saex.train.optim import make_adam, permute_latents
from saex.train.schedule import lr_factor, sparsity_factor


class Trainee:
    def __init__(self, name: str, cfg: TrainConfig, sae: SAE, device: torch.device):
        self.name, self.cfg, self.sae, self.device = name, cfg, sae.to(device), device
        self.opt = make_adam(self.sae.parameters(), cfg.lr)
        self.dead = DeadTracker(sae.d_sae, cfg.dead_tokens, device)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.fired_count_S = torch.zeros(sae.d_sae, dtype=torch.float64, device=device)  # since last re-sort
        self.last: dict = {}
        self.autocast = cfg.autocast and native_bfloat16(device)
        # the first step whose loss was not finite (-1: none), kept on the device: on a GPU, asking every step
        # would wait for it; on the CPU the loop asks every step (free there), elsewhere when it logs
        self.diverged_at = torch.tensor(-1, device=device)

    def step(self, x_BD: torch.Tensor, step: int, y_BD: torch.Tensor | None = None) -> None:
        """One optimiser step on inputs x (and a transcoder's targets y)."""
        cfg = self.cfg
        for group in self.opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg.steps, cfg.lr_warmup, cfg.lr_decay)
        n_dead = self.dead.count()
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast
                    else contextlib.nullcontext())
        self.sae.train()
        with autocast:
            skip = self.sae.skip_out(x_BD)  # a skip-transcoder's code reconstructs what its skip path leaves
            ctx = TrainContext(cfg.sparsity_coefficient * sparsity_factor(step, cfg.steps, cfg.sparsity_warmup),
                               self.dead.dead() if n_dead else None, self.generator, n_dead,
                               y_BD if skip is None else y_BD - skip if y_BD is not None else None)
            out = self.sae.train_forward(x_BD, ctx)
            loss = out.loss
        self.diverged_at = torch.where((self.diverged_at < 0) & ~torch.isfinite(loss.detach()), step,
                                       self.diverged_at)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.sae.arch.before_optimizer_step(self.sae)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.sae.parameters(), cfg.grad_clip)
        self.opt.step()
        self.sae.arch.after_optimizer_step(self.sae)
        self.dead.update(out.fired_S, len(x_BD))
        self.fired_count_S += out.fired_S
        with torch.no_grad():
            truth = x_BD if y_BD is None else y_BD
            x_hat = out.x_hat_BD.float() + (0 if skip is None else skip.float())
            fvu = (truth - x_hat).pow(2).sum() / (truth - truth.mean(0)).pow(2).sum().clamp_min(1e-12)
        self.last = {"loss": loss.detach(), "l0": out.l0.detach(), "fvu": fvu,
                     **{k: v.detach() for k, v in out.losses.items()}}
        if cfg.resample_every and (step + 1) % cfg.resample_every == 0:
            n = resample_dead(self.sae, self.opt, x_BD, self.dead.dead(), self.generator, y_BD)
            self.last["resampled"] = torch.tensor(float(n))
        if cfg.resort_every and cfg.matryoshka != "none" and (step + 1) % cfg.resort_every == 0:
            self.resort()

    @torch.no_grad()
    def resort(self) -> None:
        """Matryoshka: most frequently firing latents first; the Adam moments move with them."""
        perm = self.fired_count_S.argsort(descending=True, stable=True)
        permute_latents(self.opt, self.sae.latent_parameters(), perm)
        self.sae.permute_latents(perm)
        self.dead.since_S.copy_(self.dead.since_S[perm])
        self.fired_count_S.zero_()

    def check_finite(self) -> None:
        """Raise (naming the step) once the loss has not been finite: nothing trained after it is kept."""
        step = int(self.diverged_at)
        if step >= 0:
            raise ValueError(f"{self.name} diverged: its loss was not finite at step {step + 1}; nothing past the "
                             "last checkpoint was saved. Lower --lr, or clip gradients harder (a smaller --grad-clip; "
                             "0 turns clipping off), and run again (--overwrite starts over)")

    def metrics(self) -> dict[str, float]:
        out = {k: float(v) for k, v in self.last.items()}
        out["dead_frac"] = float(self.dead.dead().float().mean())
        out["lr"] = self.opt.param_groups[0]["lr"]
        return out

    def state_dict(self) -> dict:
        return {"sae": self.sae.state_dict(), "opt": self.opt.state_dict(), "dead": self.dead.state_dict(),
                "generator": self.generator.get_state(), "fired_count_S": self.fired_count_S.cpu(),
                "last": {k: v.cpu() for k, v in self.last.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.sae.load_state_dict(state["sae"])
        self.opt.load_state_dict(state["opt"])
        self.dead.load_state_dict(state["dead"])
        self.generator.set_state(state["generator"].cpu())  # a CPU byte tensor, whatever map_location did
        self.fired_count_S.copy_(state["fired_count_S"])
        self.last = dict(state["last"])
