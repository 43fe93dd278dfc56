"""Sparse kernels of the hot path, so that cost scales with k rather than with d_sae where it can.

`topk_encode` selects TopK(ReLU(z)) with z = (x - b_dec) W_enc + b_enc and has a backward that touches
only the selected latents: the encoder weight gradient is a sparse [S, B] x [B, d] product and the
input gradient an embedding bag, instead of two dense [B, S] x [S, d] GEMMs through a mostly-zero
[B, S] gradient. This is the torch path (CPU, and GPU until Triton kernels replace its pieces)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class TopKEncode(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")  # backward then runs under the forward's autocast state
    def forward(ctx, x_BD, W_enc_DS, b_enc_S, b_dec_D, k: int, select_dtype: torch.dtype | None):
        xc = x_BD - b_dec_D
        if select_dtype is not None and select_dtype != xc.dtype:
            # select in low precision (a cheaper GEMM); values come from the same low-precision product
            z = torch.addmm(b_enc_S.to(select_dtype), xc.to(select_dtype), W_enc_DS.to(select_dtype))
        else:
            z = torch.addmm(b_enc_S, xc, W_enc_DS)
        values, indices = z.topk(k, dim=-1, sorted=False)
        values = torch.relu(values.to(x_BD.dtype))
        ctx.save_for_backward(xc, W_enc_DS, indices, values)
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_values_BK, _grad_indices):
        xc, W_enc, indices, values = ctx.saved_tensors
        B, k = indices.shape
        S = W_enc.shape[1]
        g = grad_values_BK * (values > 0)  # the ReLU
        rows = torch.arange(B, device=g.device).repeat_interleave(k)
        G_SB = torch.sparse_coo_tensor(torch.stack([indices.reshape(-1), rows]), g.reshape(-1), (S, B),
                                       check_invariants=False)
        grad_W = torch.sparse.mm(G_SB, xc).T if ctx.needs_input_grad[1] else None  # [d, S]
        grad_b_enc = torch.zeros(S, dtype=g.dtype, device=g.device).index_add_(0, indices.reshape(-1), g.reshape(-1)) \
            if ctx.needs_input_grad[2] else None
        grad_xc = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[3]:
            grad_xc = F.embedding_bag(indices, W_enc.T.contiguous(), per_sample_weights=g, mode="sum")
        grad_x = grad_xc if ctx.needs_input_grad[0] else None
        grad_b_dec = -grad_xc.sum(0) if ctx.needs_input_grad[3] else None
        return grad_x, grad_W, grad_b_enc, grad_b_dec, None, None


def topk_encode(x_BD, W_enc_DS, b_enc_S, b_dec_D, k: int, select_dtype: torch.dtype | None = None):
    """(values [B, k], indices [B, k]) of TopK(ReLU(pre-activations)), with a sparse backward."""
    return TopKEncode.apply(x_BD, W_enc_DS, b_enc_S, b_dec_D, k, select_dtype)
