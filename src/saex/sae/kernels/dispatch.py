"""Which backend serves a tensor, and the decoder through it."""

from __future__ import annotations

import torch

from saex.sae.kernels import torch_ops, triton_ops


def backend(t: torch.Tensor):
    """The module whose primitives serve tensors like `t`: Triton on CUDA, torch elsewhere."""
    return triton_ops if triton_ops.usable(t) else torch_ops


def decode(W_SD: torch.Tensor, values_BK: torch.Tensor, indices_BK: torch.Tensor) -> torch.Tensor:
    """sum_j values[b, j] * W[indices[b, j]] -> [B, D], differentiable in W and the values."""
    return backend(W_SD).decode(W_SD, values_BK, indices_BK)
