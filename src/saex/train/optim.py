"""The optimiser and surgery on its state when latents are re-initialised or re-ordered."""

from __future__ import annotations

import torch


def make_adam(params, lr: float) -> torch.optim.Adam:
    # fused Adam, on the GPU and on the CPU alike (on 2 CPU cores at d 384 x 6,144 latents it steps in
    # 1.9 ms where the foreach path takes 6.7 ms)
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), fused=True)


def _state_tensors(opt: torch.optim.Optimizer, param: torch.Tensor):
    state = opt.state.get(param, {})
    return [v for k, v in state.items() if k in ("exp_avg", "exp_avg_sq") and v.shape == param.shape]


@torch.no_grad()
def reset_latents(opt: torch.optim.Optimizer, latent_params: dict[str, torch.Tensor], idx_L: torch.Tensor) -> None:
    """Zero the Adam moments of the given latents (after resampling them)."""
    for p in latent_params.values():
        for t in _state_tensors(opt, p):
            t.index_fill_(0, idx_L, 0.0)


@torch.no_grad()
def permute_latents(opt: torch.optim.Optimizer, latent_params: dict[str, torch.Tensor], perm_S: torch.Tensor) -> None:
    """Reorder the Adam moments of every per-latent parameter like the parameters themselves."""
    for p in latent_params.values():
        for t in _state_tensors(opt, p):
            t.copy_(t.index_select(0, perm_S))
