"""Where bfloat16 is native, and the precision of the GEMM that selects the kept latents."""

from __future__ import annotations

import torch


def select_dtype(cfg, x_BD: torch.Tensor) -> torch.dtype | None:
    """The precision of the selecting GEMM. "auto": bfloat16 where the hardware multiplies it natively
    (CUDA, CPUs with AVX512-BF16 or AMX). TopK and BatchTopK then rank bfloat16 pre-activations and ReLU
    keeps the positive ones (their kept values carry its rounding; toy runs' FVU stayed within 1 % of the
    float32 reference).
    JumpReLU only takes candidates from it and decides exactly (saex.sae.arch.jumprelu.kept_entries; on
    2 CPU cores 66 to 83 ms per step against 71 to 94 with the float32 GEMM)."""
    if cfg.select_precision == "float32":
        return None
    if cfg.select_precision == "bfloat16":
        return torch.bfloat16
    return torch.bfloat16 if native_bfloat16(x_BD.device) else None


def native_bfloat16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 natively: CUDA GPUs that support it, CPUs with AVX512-BF16 or
    AMX (where a bfloat16 GEMM takes about half the float32 one's time)."""
    if device.type == "cuda":  # Ampere and later (earlier GPUs emulate bfloat16)
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()
