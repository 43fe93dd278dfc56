"""Which backend serves a tensor, and the entry points that accept codes in top-k form or as bags."""

from __future__ import annotations

import os

import torch

from saex.sae.kernels import torch_ops, triton_ops


def backend(t: torch.Tensor):
    """The module whose primitives serve tensors like `t`: Triton on CUDA, torch elsewhere."""
    return triton_ops if triton_ops.usable(t) else torch_ops


def decode(W_SD: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
           offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted sums of rows of W, differentiable in W and the values. Either a code in top-k form
    (values and indices [B, K]) -> [B, D], or flat entries [N] in bags: bag m holds the entries
    offsets[m]:offsets[m + 1] (offsets [M + 1], no padding) -> [M, D]."""
    if offsets is None:
        B, K = indices.shape
        offsets = torch.arange(0, B * K + 1, K, device=indices.device)
    return backend(W_SD).decode(W_SD, values.reshape(-1), indices.reshape(-1), offsets)


def topk_rows(z_BS: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of each row's k largest, unordered. bfloat16 rows on CUDA go through saex's
    candidate kernel (triton_ops.topk_rows); SAEX_TOPK=torch keeps torch.topk for them too."""
    if (os.environ.get("SAEX_TOPK", "auto") != "torch" and z_BS.dtype == torch.bfloat16 and z_BS.dim() == 2
            and triton_ops.usable(z_BS)):
        return triton_ops.topk_rows(z_BS, k)
    return z_BS.topk(k, dim=-1, sorted=False)
