"""The SAE: one module for every architecture. Parameters follow SAELens' names and shapes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from saex.sae.arch import REGISTRY, TrainContext, TrainOutput
from saex.sae.code import Code
from saex.sae.config import SAEConfig
from saex.sae.kernels import decode


class SAE(nn.Module):
    def __init__(self, cfg: SAEConfig, metadata: dict | None = None):
        super().__init__()
        self.cfg = cfg.validate()
        self.d_in, self.d_sae = cfg.d_in, cfg.d_sae
        # the encoder is stored latent-major, [d_sae, d_in] like W_dec, and read as SAELens' W_enc [d_in, d_sae]
        # through a view: the sparse backward reads and writes whole latent rows, CPU BLAS runs x @ W_enc
        # faster this way (13.0 ms against 24.7 ms in bfloat16 at B 1,024 x 384 x 6,144), and fused Adam
        # needs contiguous parameters (a transposed one steps 6x slower)
        self.d_out = cfg.d_out or cfg.d_in  # what it reconstructs: its input, or a transcoder's target
        self.W_enc_SD = nn.Parameter(torch.empty(cfg.d_sae, cfg.d_in))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.W_dec = nn.Parameter(torch.empty(cfg.d_sae, self.d_out))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out))
        if cfg.skip:  # SAELens' SkipTranscoder: [d_out, d_in], zero at the start
            self.W_skip = nn.Parameter(torch.zeros(self.d_out, cfg.d_in))
        if cfg.transcoder:  # the input is not centred: its offset is a zero that takes no gradient
            self.register_buffer("zero_in", torch.zeros(cfg.d_in), persistent=False)
        self.arch = REGISTRY[cfg.architecture](cfg)
        self.metadata = dict(metadata or {})
        default_norm = 0.1 if cfg.architecture in ("relu", "prolu", "jumprelu") else 1.0
        self.init_tied(decoder_norm=cfg.decoder_init_norm or default_norm)

    @property
    def b_in(self) -> torch.Tensor:
        """What the encoder subtracts from its input: b_dec for an SAE (SAELens' apply_b_dec_to_input), zero
        for a transcoder, whose b_dec lives in the target's space."""
        return self.zero_in if self.cfg.transcoder else self.b_dec

    def skip_out(self, x_BD: torch.Tensor) -> torch.Tensor | None:
        """The skip path W_skip x of a skip-transcoder (None without one)."""
        return x_BD @ self.W_skip.T.to(x_BD.dtype) if self.cfg.skip else None

    @property
    def W_enc(self) -> torch.Tensor:
        """The encoder in SAELens' shape [d_in, d_sae] (a view: in-place writes reach the parameter)."""
        return self.W_enc_SD.T

    @torch.no_grad()
    def init_tied(self, decoder_norm: float = 1.0, generator: torch.Generator | None = None) -> None:
        """Random decoder rows of norm `decoder_norm`, encoder = decoder transposed (Gao et al.; April update)."""
        w = torch.randn(self.d_sae, self.d_out, generator=generator)
        w *= decoder_norm / w.norm(dim=1, keepdim=True)
        if self.cfg.architecture == "relu" and self.cfg.l1_variant == "classic":
            w /= w.norm(dim=1, keepdim=True)
        self.W_dec.copy_(w)
        if self.d_out != self.d_in:  # a transcoder into another width: an untied encoder of the same row norms
            w = torch.randn(self.d_sae, self.d_in, generator=generator)
            w *= self.W_dec.norm(dim=1, keepdim=True) / w.norm(dim=1, keepdim=True)
        self.W_enc.copy_(w.T)

    def pre_acts(self, x_BD: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """(x - b_dec) W_enc (+ b_enc), as a linear layer over the latent-major encoder: its weight
        gradient then comes out latent-major too, with no transposed copy."""
        return F.linear(x_BD - self.b_in, self.W_enc_SD, self.b_enc if bias else None)

    def encode(self, x_BD: torch.Tensor) -> Code:
        return self.arch.encode(self, x_BD)

    def decode(self, code: Code, bias: bool = True) -> torch.Tensor:
        """W_dec-weighted sum of the active latents (a sparse kernel: cost scales with k, not d_sae)."""
        shape = code.indices_BK.shape
        out = decode(self.W_dec, code.values_BK.reshape(-1, shape[-1]),
                     code.indices_BK.reshape(-1, shape[-1])).reshape(*shape[:-1], self.d_out)
        return out + self.b_dec if bias else out

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(x_BD, self.encode(x_BD))

    def reconstruct(self, x_BD: torch.Tensor, code: Code) -> torch.Tensor:
        """The reconstruction of x (an SAE) or of the target (a transcoder, its skip path included) from x's code."""
        out = self.decode(code)
        skip = self.skip_out(x_BD)
        return out if skip is None else out + skip

    def train_forward(self, x_BD: torch.Tensor, ctx: TrainContext) -> TrainOutput:
        return self.arch.train_forward(self, x_BD, ctx)

    @torch.no_grad()
    def fold_input_scale(self, scale: float, target_scale: float | None = None) -> None:
        """Make an SAE trained on scale * x (a transcoder: to reconstruct target_scale * y) take raw x and
        return raw reconstructions.

        Pre-activations, codes and thresholds are unchanged: W_enc -> s W_enc, W_dec -> W_dec / t,
        b_dec -> b_dec / t, W_skip -> W_skip s / t (t = s for an SAE; its b_in = b_dec scales with it)."""
        t = scale if target_scale is None else target_scale
        self.W_enc.mul_(scale)
        self.W_dec.div_(t)
        self.b_dec.div_(t)
        if self.cfg.skip:
            self.W_skip.mul_(scale / t)

    @torch.no_grad()
    def permute_latents(self, perm_S: torch.Tensor) -> None:
        """Reorder latents (Matryoshka re-sorting); the optimiser state must follow (saex.train)."""
        for p in self.latent_parameters().values():
            p.copy_(p.index_select(0, perm_S))

    def latent_parameters(self) -> dict[str, torch.Tensor]:
        """Parameters with one entry per latent along their first axis."""
        out = {"W_enc_SD": self.W_enc_SD, "b_enc": self.b_enc, "W_dec": self.W_dec}
        for name, p in self.arch.named_parameters():
            if p.shape[:1] == (self.d_sae,):
                out[f"arch.{name}"] = p
        return out
