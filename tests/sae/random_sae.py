"""An SAE of any architecture with every parameter away from its initial value (biases, gates and
thresholds included), so that a save/load or interop test sees each of them."""

import torch

from saex.sae import SAE, SAEConfig


def random_sae(arch: str, d_in: int, d_sae: int, k: int, seed: int = 0, **fields) -> SAE:
    """`fields`: more SAEConfig fields (a transcoder: transcoder=True, d_out, skip)."""
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, architecture=arch, k=k, **fields))
    with torch.no_grad():
        if sae.cfg.skip:
            sae.W_skip.normal_(0, 0.3)
        sae.b_enc.normal_(0, 0.2)
        sae.b_dec.normal_(0, 0.2)
        for p in sae.arch.parameters():
            p.uniform_(0.05, 0.2)
        if arch == "batchtopk":
            sae.arch.threshold.fill_(0.1)
    return sae.eval()
