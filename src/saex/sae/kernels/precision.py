"""The precision of the GEMM that selects the kept latents."""

from __future__ import annotations

import torch


def select_dtype(cfg, x_BD: torch.Tensor) -> torch.dtype | None:
    """The precision of the selecting GEMM. "auto": bfloat16 where the hardware multiplies it natively
    (CUDA, CPUs with AVX512-BF16 or AMX). TopK and BatchTopK then rank bfloat16 pre-activations (their
    kept values carry its rounding; a toy run's FVU stayed within 1 % of the float32 reference);
    JumpReLU only takes candidates from it and decides exactly (saex.sae.arch.jumprelu.kept_entries)."""
    if cfg.select_precision == "float32":
        return None
    if cfg.select_precision == "bfloat16":
        return torch.bfloat16
    native = (torch.cuda.is_bf16_supported() if x_BD.is_cuda
              else x_BD.device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return torch.bfloat16 if native else None
