"""The precision of the GEMM that selects the kept latents."""

from __future__ import annotations

import torch


def select_dtype(cfg, x_BD: torch.Tensor) -> torch.dtype | None:
    """The precision of the selecting GEMM. "auto": bfloat16 for the rank-based selections (TopK, BatchTopK)
    where the hardware multiplies it natively, float32 for JumpReLU, whose thresholds compare against
    values and learn from a narrow window around them (on a toy run, bfloat16 moved its final FVU by
    1.7 %; float32 on the sparse kernel matched the dense reference to 5e-7)."""
    if cfg.select_precision == "float32" or (cfg.select_precision == "auto" and cfg.architecture == "jumprelu"):
        return None
    if cfg.select_precision == "bfloat16":
        return torch.bfloat16
    native = (torch.cuda.is_bf16_supported() if x_BD.is_cuda
              else x_BD.device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return torch.bfloat16 if native else None
