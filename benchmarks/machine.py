"""What the benchmarks ran on, for their JSON: CPU timings depend on the instruction set as much as on the
core count (a bfloat16 GEMM halves the encoder's time on CPUs with AVX512-BF16 or AMX; with AVX2 alone
saex trains in float32, as sparsify and SAELens do)."""

from __future__ import annotations

import torch


def describe(device: torch.device | str) -> str:
    """The GPU's name, or the CPU's model with its threads and whether it multiplies bfloat16 natively."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from saex.sae.kernels.precision import native_bfloat16

    model = "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    bf16 = "native bfloat16" if native_bfloat16(device) else "no native bfloat16"
    return f"{model} ({torch.get_num_threads()} threads, {bf16})"
