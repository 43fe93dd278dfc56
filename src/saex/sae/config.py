"""What defines an SAE: its sizes, its architecture and that architecture's knobs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu", "gated", "prolu")


@dataclass
class SAEConfig:
    d_in: int = field(default=0, metadata={"cli": False})
    """Width of the activations (set from the store)."""
    d_sae: int = 0
    """Number of latents (0: expansion x d_in)."""
    architecture: Literal["relu", "topk", "batchtopk", "jumprelu", "gated", "prolu"] = "topk"
    """Activation function and sparsity loss."""
    k: int = 32
    """TopK/BatchTopK: active latents per token (BatchTopK: on average)."""
    sparsity_coefficient: float = 5.0
    """lambda of the sparsity penalty: L1 (relu, gated, prolu) or L0 (jumprelu); unused by topk/batchtopk."""
    l1_variant: Literal["classic", "april"] = "april"
    """relu: classic (unit-norm decoder rows, plain L1) or april (L1 weighted by decoder row norms, free norms)."""
    prolu_grad: Literal["ste", "relu"] = "ste"
    """ProLU: the bias/magnitude gradients of seed 003 (ste) or plain ReLU-like ones (relu)."""
    aux_k: int = 0
    """TopK/BatchTopK: AuxK latents drawn from the dead ones (0: d_in // 2; -1: no AuxK)."""
    aux_coefficient: float = 1 / 32
    """Weight of the AuxK loss."""
    multi_topk: bool = False
    """TopK: add the loss at 4k latents, weighted 1/8 (Multi-TopK)."""
    matryoshka: Literal["none", "fixed", "random"] = "none"
    """TopK/BatchTopK: nested prefix losses over fixed groups or random prefix lengths."""
    matryoshka_groups: list[float] = field(default_factory=lambda: [1 / 16, 1 / 16, 1 / 8, 1 / 4, 1 / 2])
    """Fixed Matryoshka groups as fractions of d_sae (their sum is 1)."""
    matryoshka_prefixes: int = 10
    """Random Matryoshka: prefix lengths sampled per step."""
    jumprelu_bandwidth: float = 0.05
    """JumpReLU: width of the rectangle kernel of the straight-through gradients."""
    jumprelu_threshold: float = 0.1
    """JumpReLU: initial threshold of every latent (when --jumprelu-init-l0 is 0)."""
    jumprelu_init_l0: int = 64
    """JumpReLU: start each threshold at the quantile of its pre-activations that gives this L0 (0: off)."""
    ghost_grads: bool = False
    """relu: ghost gradients for dead latents (seed 002)."""
    batchtopk_momentum: float = 0.01
    """BatchTopK: step of the running estimate of the inference threshold."""

    encoder_kernel: Literal["sparse", "dense"] = "sparse"
    """Encode with the sparse kernels (saex.sae.kernels: TopK and BatchTopK always; JumpReLU, ReLU, Gated and
    ProLU once their codes are sparse) or plain autograd (the reference)."""
    select_precision: Literal["auto", "float32", "bfloat16"] = "auto"
    """Sparse kernels: precision of the GEMM that selects the kept latents (auto: bfloat16 where the GPU or CPU
    multiplies it natively; TopK's, BatchTopK's and ReLU's kept values carry its rounding, JumpReLU decides
    exactly from its candidates)."""
    decoder_init_norm: float = 0.0
    """Norm of the initial decoder rows (0: 0.1 for the L1/L0-penalised architectures, 1 otherwise)."""
    transcoder: bool = field(default=False, metadata={"cli": False})
    """Reconstruct another activation (a target hook) from the input's code, as SAELens' transcoders do: the
    input is not centred by b_dec, which lives in the target's space (set by saex train --target)."""
    d_out: int = field(default=0, metadata={"cli": False})
    """Width of the transcoder's target (0: d_in; set from the store)."""
    skip: bool = False
    """Transcoder: add a learned linear skip path W_skip x to the reconstruction (a skip-transcoder)."""

    def validate(self) -> "SAEConfig":
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture {self.architecture!r} is not one of {list(ARCHITECTURES)}")
        if self.d_in < 1 or self.d_sae < 1 or self.d_out < 0:
            raise ValueError(f"d_in and d_sae must be >= 1 and d_out >= 0, got {self.d_in}, {self.d_sae} and "
                             f"{self.d_out}")
        if (self.skip or self.d_out) and not self.transcoder:
            raise ValueError("skip and d_out belong to transcoders: give the target hook (saex train --target)")
        if self.architecture in ("topk", "batchtopk") and not 1 <= self.k <= self.d_sae:
            raise ValueError(f"k must lie in [1, d_sae={self.d_sae}], got {self.k}")
        if self.matryoshka != "none" and self.architecture not in ("topk", "batchtopk"):
            raise ValueError(f"matryoshka works with topk or batchtopk, not {self.architecture!r}")
        if self.matryoshka == "fixed" and abs(sum(self.matryoshka_groups) - 1) > 1e-6:
            raise ValueError(f"matryoshka_groups must sum to 1, got {self.matryoshka_groups} "
                             f"(sum {sum(self.matryoshka_groups)})")
        return self
