"""Launchers of the Triton kernels and the decoder as an autograd function built on them.

Importing this module never needs a GPU or Triton: `usable` says whether the kernels can serve a
tensor (Triton importable, tensor on CUDA, SAEX_KERNELS not "torch"); the tests call the launchers on
CPU tensors under TRITON_INTERPRET=1."""

from __future__ import annotations

import contextlib
import os

import torch
from torch.autograd.function import once_differentiable

try:
    import triton

    from saex.sae.kernels import triton_kernels as K
except ImportError:  # no Triton here: the torch path serves every tensor
    triton, K = None, None

AVAILABLE = K is not None
# first guesses for d_in ~1,024 on an H100, not yet tuned on one: a d-block of 256 keeps a program's
# row reads at 1 KiB, and the scatter's entry block is small because latents hold ~2 entries each
BLOCK_D = 256
BLOCK_K = 32
BLOCK_E = 4


def usable(t: torch.Tensor) -> bool:
    return AVAILABLE and t.is_cuda and os.environ.get("SAEX_KERNELS", "auto") != "torch"


def _on(t: torch.Tensor):
    """Launch on the tensor's GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _acc(*tensors):
    import triton.language as tl

    return tl.float64 if any(t.dtype == torch.float64 for t in tensors) else tl.float32


def gather_sum(W_SD, values_BK, indices_BK, out_dtype=None) -> torch.Tensor:
    """sum_j values[b, j] W[indices[b, j]]  -> [B, D]."""
    assert W_SD.stride(1) == 1, "rows of W must be contiguous"
    B, Kk = indices_BK.shape
    D = W_SD.shape[1]
    out = torch.empty(B, D, dtype=out_dtype or W_SD.dtype, device=W_SD.device)
    with _on(W_SD):
        K.gather_sum_kernel[(B, triton.cdiv(D, BLOCK_D))](
            W_SD, values_BK.contiguous(), indices_BK.contiguous(), out, Kk, D, W_SD.stride(0),
            ACC=_acc(W_SD, values_BK), BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D)
    return out


def gather_dot(G_BD, W_SD, indices_BK, out_dtype=None) -> torch.Tensor:
    """<G[b], W[indices[b, j]]>  -> [B, K]."""
    assert W_SD.stride(1) == 1, "rows of W must be contiguous"
    B, Kk = indices_BK.shape
    D = W_SD.shape[1]
    out = torch.empty(B, Kk, dtype=out_dtype or G_BD.dtype, device=G_BD.device)
    with _on(W_SD):
        K.gather_dot_kernel[(B, triton.cdiv(Kk, BLOCK_K))](
            G_BD.contiguous(), W_SD, indices_BK.contiguous(), out, Kk, D, W_SD.stride(0),
            ACC=_acc(G_BD, W_SD), BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D)
    return out


def scatter_rows(X_BD, values_BK, indices_BK, S: int) -> torch.Tensor:
    """out[s] = sum over (b, j) with indices[b, j] = s of values[b, j] X[b]  -> [S, D], float32 or wider.

    Entries are sorted by latent once; zero-valued ones (padding, silent window entries) get the key S
    and fall outside every latent's segment. Segment starts come from a search, with no host sync."""
    Kk = indices_BK.shape[1]
    D = X_BD.shape[1]
    values = values_BK.reshape(-1)
    keys, order = torch.where(values != 0, indices_BK.reshape(-1), S).sort()
    starts = torch.searchsorted(keys, torch.arange(S + 1, device=keys.device, dtype=keys.dtype))
    out = torch.empty(S, D, dtype=torch.promote_types(X_BD.dtype, torch.float32), device=X_BD.device)
    with _on(X_BD):
        K.scatter_rows_kernel[(S, triton.cdiv(D, BLOCK_D))](
            X_BD.contiguous(), values[order].contiguous(), (order // Kk).contiguous(), starts, out, D,
            ACC=_acc(X_BD, values_BK), BLOCK_E=BLOCK_E, BLOCK_D=BLOCK_D)
    return out


class Decode(torch.autograd.Function):
    """The decoder on the Triton kernels: forward gather_sum; backward gather_dot and scatter_rows."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, W_SD, values_BK, indices_BK):
        ctx.save_for_backward(W_SD, values_BK, indices_BK)
        return gather_sum(W_SD, values_BK, indices_BK)

    @staticmethod
    @once_differentiable
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_BD):
        W_SD, values_BK, indices_BK = ctx.saved_tensors
        grad_W = scatter_rows(grad_BD, values_BK, indices_BK, W_SD.shape[0]).to(W_SD.dtype) \
            if ctx.needs_input_grad[0] else None
        grad_v = gather_dot(grad_BD, W_SD, indices_BK, values_BK.dtype) if ctx.needs_input_grad[1] else None
        return grad_W, grad_v, None


def decode(W_SD, values_BK, indices_BK) -> torch.Tensor:
    return Decode.apply(W_SD, values_BK, indices_BK)
