"""The encoder with a sparse backward, for every architecture that keeps a selection of z.

Forward: z = (x - b_dec) W_enc + b_enc (one GEMM, optionally in bfloat16), then the architecture's
selection, which returns the kept latents' activations (z where positive, else 0) as bags of entries.
Backward touches only the kept latents: the encoder weight gradient is `scatter_rows` of the centred
inputs and the input gradient a `decode` through the encoder, instead of two dense [B, S] x [S, D]
GEMMs through a mostly-zero [B, S] gradient. The encoder comes latent-major, W_enc_SD = W_enc^T, as
`saex.sae.SAE` stores it."""

from __future__ import annotations

from typing import Callable

import torch
from torch.autograd.function import once_differentiable

from saex.sae.code import Bags, Code, masked_entries, row_offsets
from saex.sae.kernels.dispatch import backend, positive_mask, relu_topk_rows

Select = Callable[[torch.Tensor], Bags]


class SparseEncode(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")  # on CUDA the backward runs under the forward's autocast state
    def forward(ctx, x_BD, W_enc_SD, b_enc_S, b_dec_D, select: Select, select_dtype: torch.dtype | None):
        xc_BD = x_BD - b_dec_D
        # with select_dtype bfloat16 the selecting GEMM is cheaper; the values come from the same product
        z_BS = biased_gemm(xc_BD, W_enc_SD, b_enc_S, select_dtype or xc_BD.dtype)
        code = select(z_BS)
        values_N = code.values_N.to(x_BD.dtype)
        ctx.save_for_backward(xc_BD, W_enc_SD, code.indices_N, code.rows(), code.offsets, values_N)
        ctx.mark_non_differentiable(code.indices_N, code.offsets)
        return values_N, code.indices_N, code.offsets

    @staticmethod
    @once_differentiable
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_values_N, _grad_indices, _grad_offsets):
        xc_BD, W_enc_SD, indices_N, rows_N, offsets, values_N = ctx.saved_tensors
        g_N = grad_values_N * (values_N > 0)  # kept latents with z <= 0 output 0 (the ReLU)
        return (*encoder_grads(ctx.needs_input_grad[:4], xc_BD, W_enc_SD, indices_N, g_N, rows_N, offsets),
                None, None)


def encoder_grads(needs, xc_BD, W_enc_SD, indices_N, g_N, rows_N, offsets):
    """Gradients of (x, W_enc, b_enc, b_dec) from g = dL/dz at the kept entries (flat, with their rows
    and one bag per row), zero elsewhere."""
    ops = backend(W_enc_SD)
    S = W_enc_SD.shape[0]
    g_N = g_N.to(W_enc_SD.dtype)  # accumulate in the master weights' precision
    if needs[1]:  # the bias gradient (each latent's sum of g) comes with the weights' scatter
        grad_W, grad_b_enc = ops.scatter_rows(xc_BD, g_N, indices_N, rows_N, S)
        grad_W, grad_b_enc = grad_W.to(W_enc_SD.dtype), grad_b_enc.to(g_N.dtype)
    else:
        grad_W, grad_b_enc = None, torch.zeros(S, dtype=g_N.dtype, device=g_N.device).index_add_(0, indices_N, g_N)
    grad_x = ops.decode(W_enc_SD, g_N, indices_N, offsets).to(xc_BD.dtype) if needs[0] else None
    # sum_b dL/dxc_b = sum_s (sum of s's g) W_enc_SD[s]: a product with grad_b_enc, no [B, D] gather; in
    # the master weights' precision whatever autocast the backward runs under
    grad_b_dec = None
    if needs[3]:
        with torch.autocast(xc_BD.device.type, enabled=False):
            grad_b_dec = -(grad_x.sum(0) if grad_x is not None else grad_b_enc @ W_enc_SD)
    return grad_x, grad_W, grad_b_enc if needs[2] else None, grad_b_dec


def biased_gemm(x_BD: torch.Tensor, W_SD: torch.Tensor, b_S: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x W^T + b in `dtype`. One addmm on CUDA (cuBLAS fuses the bias into its epilogue) and in float32
    (MKL accumulates onto the copied bias: 29.0 against 31.2 ms for the form below on 2 AVX2 cores at
    1,024 x 384 x 6,144). In a CPU's bfloat16 the bias rides in the GEMM as a column of ones (addmm
    first copies the broadcast bias into the [B, S] output: 14.1 against 13.0 ms on 2 AVX512-BF16
    cores), the inner size padded to a multiple of 8 for the GEMM's alignment."""
    with torch.autocast(x_BD.device.type, enabled=False):  # `dtype` decides, not an enclosing autocast
        if x_BD.is_cuda or dtype.itemsize >= 4:
            return torch.addmm(b_S.to(dtype), x_BD.to(dtype), W_SD.T.to(dtype))
        return _augmented_gemm(x_BD, W_SD, b_S, dtype)


def _augmented_gemm(x_BD, W_SD, b_S, dtype):
    B, D = x_BD.shape
    width = (D + 1 + 7) // 8 * 8
    x_aug = x_BD.new_zeros(B, width, dtype=dtype)
    x_aug[:, :D] = x_BD
    x_aug[:, D] = 1
    W_aug = W_SD.new_zeros(W_SD.shape[0], width, dtype=dtype)
    W_aug[:, :D] = W_SD
    W_aug[:, D] = b_S
    return x_aug @ W_aug.T


def sparse_encode(x_BD, W_enc_SD, b_enc_S, b_dec_D, select: Select, select_dtype: torch.dtype | None = None) -> Bags:
    """The code `select(z)` keeps, with a backward that touches only the kept latents. `select` returns
    the kept latents' activations (z where positive, else 0) as bags, one per row."""
    if W_enc_SD.stride(-1) != 1:
        raise ValueError(f"sparse_encode needs the encoder latent-major with contiguous rows ([d_sae, d_in]); "
                         f"got strides {W_enc_SD.stride()} for shape {tuple(W_enc_SD.shape)}")
    return Bags(*SparseEncode.apply(x_BD, W_enc_SD, b_enc_S, b_dec_D, select, select_dtype), W_enc_SD.shape[0])


def topk_code(z_BS: torch.Tensor, k: int) -> Code:
    """TopK(ReLU(z)) in top-k form, through the one top-k entry point (saex's kernel where opted in)."""
    return Code(*relu_topk_rows(z_BS, k), z_BS.shape[-1])


def positive_code(z_BS: torch.Tensor, lower_S: torch.Tensor | None = None) -> Bags:
    """The entries of z above max(lower, 0) (ReLU's nonzero ones without a bound), NaN among them, one bag
    per row, the values carrying z's gradient."""
    rows_N, indices_N, flat = masked_entries(positive_mask(z_BS, lower_S))
    return Bags(z_BS.flatten()[flat], indices_N, row_offsets(rows_N, z_BS.shape[0]), z_BS.shape[-1])


def topk_encode(x_BD, W_enc_SD, b_enc_S, b_dec_D, k: int, select_dtype: torch.dtype | None = None):
    """(values [B, k], indices [B, k]) of TopK(ReLU(pre-activations)), with a sparse backward."""
    code = sparse_encode(x_BD, W_enc_SD, b_enc_S, b_dec_D, lambda z: topk_code(z, k).bags(), select_dtype)
    return code.values_N.view(-1, k), code.indices_N.view(-1, k)
