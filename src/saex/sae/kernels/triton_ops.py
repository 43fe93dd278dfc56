"""Launchers of the Triton kernels and the decoder as an autograd function built on them.

Importing this module never needs a GPU or Triton: `usable` says whether the kernels can serve a
tensor (Triton importable, tensor on CUDA, SAEX_KERNELS not "torch"); the tests call the launchers on
CPU tensors under TRITON_INTERPRET=1."""

from __future__ import annotations

import contextlib
import os

import torch
from torch.autograd.function import once_differentiable

from saex.sae.code import bag_rows

try:
    import triton

    from saex.sae.kernels import triton_kernels as K
except ImportError:  # no Triton here: the torch path serves every tensor
    triton, K = None, None

AVAILABLE = K is not None
# launch parameters per kernel: the fastest of benchmarks/kernels.py's grid on an H100 at d_in 1,024,
# 65,536 latents, batch 4,096, k 32 (2026-11-23: gather 153 us, scatter 328 us, dot 180 us)
TUNING = {
    "gather": {"BLOCK_E": 8, "BLOCK_D": 256, "num_warps": 4},
    "scatter": {"BLOCK_E": 4, "BLOCK_D": 512, "num_warps": 4},
    "dot": {"BLOCK_E": 16, "BLOCK_D": 128, "num_warps": 4},
    "group_max": {"BLOCK": 256, "num_warps": 4},
}


def usable(t: torch.Tensor) -> bool:
    return AVAILABLE and t.is_cuda and os.environ.get("SAEX_KERNELS", "auto") != "torch"


def _on(t: torch.Tensor):
    """Launch on the tensor's GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _acc(*tensors):
    import triton.language as tl

    return tl.float64 if any(t.dtype == torch.float64 for t in tensors) else tl.float32


def gather_sum(W_SD, values_N, indices_N, offsets, out_dtype=None) -> torch.Tensor:
    """out[m] = sum of values[e] W[indices[e]] over bag m's entries  -> [M, D]."""
    assert W_SD.stride(1) == 1, "rows of W must be contiguous"
    M, D = offsets.numel() - 1, W_SD.shape[1]
    out = torch.empty(M, D, dtype=out_dtype or W_SD.dtype, device=W_SD.device)
    with _on(W_SD):
        K.segment_sum_kernel[(M, triton.cdiv(D, TUNING["gather"]["BLOCK_D"]))](
            W_SD, values_N.contiguous(), indices_N.contiguous(), offsets.contiguous(), out, out, D, W_SD.stride(0),
            ACC=_acc(W_SD, values_N), SUMS=False, **TUNING["gather"])
    return out


def gather_dot(G_MD, W_SD, indices_N, rows_N, out_dtype=None) -> torch.Tensor:
    """out[e] = <G[rows[e]], W[indices[e]]>  -> [N]."""
    assert W_SD.stride(1) == 1, "rows of W must be contiguous"
    N, D = indices_N.numel(), W_SD.shape[1]
    out = torch.empty(N, dtype=out_dtype or G_MD.dtype, device=G_MD.device)
    with _on(W_SD):
        K.gather_dot_kernel[(triton.cdiv(N, TUNING["dot"]["BLOCK_E"]),)](
            G_MD.contiguous(), W_SD, indices_N.contiguous(), rows_N.contiguous(), out, N, D, W_SD.stride(0),
            ACC=_acc(G_MD, W_SD), **TUNING["dot"])
    return out


def scatter_rows(X_BD, values_N, indices_N, rows_N, S: int) -> tuple[torch.Tensor, torch.Tensor]:
    """out[s] = sum over the entries e with indices[e] = s of values[e] X[rows[e]]  -> [S, D], float32 or
    wider, and each latent's sum of values -> [S].

    Entries are sorted (stably: sums in a fixed order) by latent once; zero-valued ones (padding, rows'
    kept latents whose ReLU is 0) get the key S and fall outside every latent's segment. Segment starts come from a
    search, with no host sync."""
    D = X_BD.shape[1]
    keys, order = torch.where(values_N != 0, indices_N, S).sort(stable=True)
    starts = torch.searchsorted(keys, torch.arange(S + 1, device=keys.device, dtype=keys.dtype))
    dtype = torch.promote_types(X_BD.dtype, torch.float32)
    out = torch.empty(S, D, dtype=dtype, device=X_BD.device)
    sums = torch.empty(S, dtype=dtype, device=X_BD.device)
    with _on(X_BD):
        K.segment_sum_kernel[(S, triton.cdiv(D, TUNING["scatter"]["BLOCK_D"]))](
            X_BD.contiguous(), values_N[order].contiguous(), rows_N[order].contiguous(), starts, out, sums, D, D,
            ACC=_acc(X_BD, values_N), SUMS=True, **TUNING["scatter"])
    return out, sums


def group_max(z: torch.Tensor, G: int) -> torch.Tensor:
    """Maxima of z's consecutive groups of G entries (z contiguous, its last size a multiple of G): one
    pass at memory speed, where torch's amax over a last dimension of 16 took 2.2 ms for 4,096 x 65,536
    bfloat16 on an H100 (torch.topk of the whole rows: 2.0 ms)."""
    z = z.contiguous()
    out = torch.empty(*z.shape[:-1], z.shape[-1] // G, dtype=z.dtype, device=z.device)
    n = out.numel()
    with _on(z):
        K.group_max_kernel[(triton.cdiv(n, TUNING["group_max"]["BLOCK"]),)](z, out, n, G=G, **TUNING["group_max"])
    return out


def entry_dots(G_MD, W_SD, indices_N, offsets) -> torch.Tensor:
    """<G[m], W[indices[e]]> for each entry e of bag m  -> [N]."""
    return gather_dot(G_MD, W_SD, indices_N, bag_rows(offsets, indices_N.numel()))


class Decode(torch.autograd.Function):
    """The decoder on the Triton kernels: forward gather_sum; backward gather_dot and scatter_rows."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, W_SD, values_N, indices_N, offsets):
        ctx.save_for_backward(W_SD, values_N, indices_N, offsets)
        return gather_sum(W_SD, values_N, indices_N, offsets)

    @staticmethod
    @once_differentiable
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_MD):
        W_SD, values_N, indices_N, offsets = ctx.saved_tensors
        rows_N = bag_rows(offsets, indices_N.numel())
        grad_W = scatter_rows(grad_MD, values_N, indices_N, rows_N, W_SD.shape[0])[0].to(W_SD.dtype) \
            if ctx.needs_input_grad[0] else None
        grad_v = gather_dot(grad_MD, W_SD, indices_N, rows_N, values_N.dtype) if ctx.needs_input_grad[1] else None
        return grad_W, grad_v, None, None


def decode(W_SD, values_N, indices_N, offsets) -> torch.Tensor:
    return Decode.apply(W_SD, values_N, indices_N, offsets)
